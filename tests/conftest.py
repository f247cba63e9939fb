"""One torch thread per pytest process: the suite runs on two workers (``-n 2``), one per core; more threads
than cores makes small tensor work several times slower."""

import torch

torch.set_num_threads(1)
