"""The benchmark scripts run end to end in their --quick modes (smoke runs)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import accuracy  # noqa: E402
import overhead  # noqa: E402

from tests.helpers import launch_env  # noqa: E402


def test_overhead_quick(tmp_path):
    out = tmp_path / "overhead.md"
    overhead.main(["--quick", "--out", str(out)])
    text = out.read_text()
    for row in ("| plain |", "| L2SP |", "| DTNH+L2SP |", "| DELTA |", "| RIFLE |", "| MEI |", "floor (read w, w0, g; write g)",
                "| SPD |", "| BSS |", "| Co-Tuning |", "| StochNorm |", "| SPD, both halves around the step", "| LiNeS("):
        assert row in text, row


def test_accuracy_quick_and_resume(tmp_path, capsys):
    accuracy.main(["--quick", "--out", str(tmp_path)])
    text = (tmp_path / "results.md").read_text()
    assert "| plain |" in text and "| MEI |" in text
    capsys.readouterr()
    accuracy.main(["--quick", "--out", str(tmp_path)])  # finished runs are not recomputed
    assert "test_acc=" not in capsys.readouterr().out


def test_accuracy_controlled_quick(tmp_path):
    import accuracy_controlled

    accuracy_controlled.main(["--quick", "--out", str(tmp_path)])
    text = (tmp_path / "results.md").read_text()
    for row in ("### close target", "### far target", "| plain |", "| MEI |", "Depth scan (far)"):
        assert row in text, row
    assert (tmp_path / "source_cnn_1ep.pt").is_file()


def test_sharded_quick(tmp_path):
    """2 CPU ranks under FSDP2; a subprocess, because Lightning's launcher re-runs sys.argv."""
    import subprocess

    out = tmp_path / "sharded.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sharded.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for row in ("| plain |", "| L2SP |", "| L2SP+DTNH |"):
        assert row in text, row


def test_accuracy_transformer_quick(tmp_path):
    """Benchmark C end to end: a 1-epoch source ViT, both scans per target, then plain and layer decay."""
    import accuracy_transformer

    accuracy_transformer.main(["--quick", "--out", str(tmp_path)])
    text = (tmp_path / "results.md").read_text()
    for row in ("### close target", "### far target", "| plain |", "| layer decay |",
                "Learning-rate scan (close)", "Depth scan (far)", "largest |as trained − re-estimated|"):
        assert row in text, row
    assert (tmp_path / "source_vit_1ep.pt").is_file()


def test_tuned_same_seed_gives_the_same_numbers_and_records_how_it_ran(tmp_path):
    """Determinism: two runs of one seed agree exactly, to the test loss; each row says how it ran."""
    import csv

    import tuned

    rows = []
    for run in ("first", "second"):
        tuned.main(["--quick", "--methods", "plain", "--out", str(tmp_path / run)])
        rows.append(list(csv.DictReader(open(tmp_path / run / "runs.csv"))))
    assert len(rows[0]) == 4  # the four learning rates of plain fine-tuning
    measured = ("setting", "val_acc", "test_acc", "test_loss", "probe_val_acc", "probe_test_acc", "probe_l2")
    assert [[r[k] for k in measured] for r in rows[0]] == [[r[k] for k in measured] for r in rows[1]]
    assert all(r["threads"] == "1" and r["deterministic"] == "True" and r["torch"] for r in rows[0])
    assert "| plain | lr " in (tmp_path / "first" / "results.md").read_text()


def test_tuned_summary_pairs_by_seed_and_marks_only_intervals_that_exclude_zero():
    """The summary's cell is the paired mean difference to plain in points; bold only when the 95% interval
    excludes zero; '—' where a method did not run on a task."""
    import tuned_report

    def row(task, method, seed, acc):
        return {"task": task, "method": method, "setting": "s", "seed": str(seed), "val_acc": "0.5",
                "test_acc": str(acc), "steps_after_last_reinit": ""}

    plain = [0.70, 0.80, 0.60]
    rows = [row(t, "plain", s, a) for t in ("X", "Y") for s, a in enumerate(plain)]
    rows += [row("X", "steady", s, a + 0.05 + 0.001 * s) for s, a in enumerate(plain)]  # +5 points every seed
    rows += [row("X", "noisy", s, a + d) for s, (a, d) in enumerate(zip(plain, (0.10, -0.08, 0.04)))]  # mean +2
    lines = tuned_report.summary(rows, {"X": None, "Y": None}, ["plain", "steady", "noisy"])
    table = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").split(" | ")[1:] for line in lines
             if line.startswith("| ")}
    assert table["plain (test acc)"] == ["0.700", "0.700"]
    assert table["steady"] == ["**+5.1**", "—"]
    assert table["noisy"] == ["+2.0", "—"]
