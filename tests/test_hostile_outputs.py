"""Hostile conditions on the output side (issue #25, classes 4-7), through the real CLI.

- all outputs or none: a full disk on the second output, concurrent runs into one --out;
- exit 2 with one line, never an internal error: extreme numbers, symlink loops, an ASCII
  terminal, out-of-range options;
- Markdown hygiene: no @mentions, code spans that hold backticks, escaped HTML and pipes;
  output names as long as the file system allows;
- verdicts: an all-zero adapter is a flagged free rider, near-copies say so.

Subprocess runs have generous time limits: the machine may be loaded.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import MODULES, invoke_cli, random_factors, skip_unless_safetensors_writes, write_adapter
from safetensors.torch import load_file

TIMEOUT = 300


def _clair(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "clair_cli", *args], capture_output=True, text=True, env=full, timeout=TIMEOUT
    )


def _invoke(*args: str) -> subprocess.CompletedProcess[str]:
    """A command in this process (:func:`helpers.invoke_cli`), as wide as :func:`_clair`'s: where what it
    reads, decides or writes is tested, not the process."""
    return invoke_cli(*args, columns=200)


def _pool(root: Path, n: int = 6, first_seed: int = 0) -> Path:
    for k in range(n):
        write_adapter(root / f"a{k}", random_factors(MODULES, seed=first_seed + k))
    return root


def _one_error_line(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("Error: ") and len(lines) <= 2, lines
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _no_staging(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# --- class 4: all outputs or none ------------------------------------------------------------


def _fail_second_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up while the second output is written (the first is the --out directory,
    written by safetensors and pathlib; report files go through os.fdopen)."""
    import clair_cli.io.writers as writers

    real = writers.os.fdopen

    class Full:
        def __init__(self, fh: object) -> None:
            self.fh = fh

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()  # type: ignore[attr-defined]

        def write(self, _data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writers.os, "fdopen", lambda fd, *a, **k: Full(real(fd, *a, **k)))


def test_full_disk_on_the_second_output_writes_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from clair_cli.cli import app

    pool = _pool(tmp_path / "pool")
    out = tmp_path / "out"
    out.mkdir()
    _fail_second_output(monkeypatch)
    result = CliRunner().invoke(
        app, ["merge", str(pool), "--out", str(out / "m"), "--json", str(out / "r.json"), "--exit-zero"]
    )
    assert result.exit_code == 2, result.output
    assert "no space left on the device" in result.stderr and "r.json" in result.stderr
    assert list(out.iterdir()) == [], "neither --out nor --json, nor a staging file, may be left"


def test_full_disk_keeps_every_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from clair_cli.cli import app

    pool = _pool(tmp_path / "pool")
    out = tmp_path / "out"
    (out / "m").mkdir(parents=True)
    (out / "m" / "old.txt").write_text("old adapter")
    (out / "r.json").write_text("old report")
    (out / "r.md").write_text("old markdown")
    _fail_second_output(monkeypatch)
    args = ["--json", str(out / "r.json"), "--markdown", str(out / "r.md"), "--exit-zero"]
    for argv in (["merge", str(pool), "--out", str(out / "m"), "--force", *args], ["audit", str(pool), *args]):
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 2, result.output
        assert (out / "m" / "old.txt").read_text() == "old adapter"
        assert (out / "r.json").read_text() == "old report"
        assert (out / "r.md").read_text() == "old markdown"
        assert sorted(p.name for p in out.iterdir()) == ["m", "r.json", "r.md"]


def test_a_failed_rename_puts_back_what_was_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import clair_cli.io.writers as writers
    from clair_cli.errors import OutputError

    (tmp_path / "a.json").write_text("old a")
    real = writers.os.replace
    calls = []

    def second_fails(src: object, dst: object) -> None:
        calls.append(dst)
        if Path(str(dst)).name == "b.json":
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(writers.os, "replace", second_fails)
    with pytest.raises(OutputError, match="b.json"), writers.Outputs() as outputs:
        outputs.write_text(str(tmp_path / "a.json"), "new a")
        outputs.write_text(str(tmp_path / "b.json"), "new b")
    assert (tmp_path / "a.json").read_text() == "old a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def _merged_from(directory: Path) -> str:
    """Which pool a merged directory came from, by its card, config, tensors and report, which must agree."""
    card = (directory / "README.md").read_text()
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    pools = {p for p in ("poolA", "poolB") if p in card}
    assert len(pools) == 1, card
    (pool,) = pools
    return f"{pool}:{config['r']}:{sorted(tensors)[0]}:{float(next(iter(tensors.values())).abs().sum()):.6g}"


@pytest.mark.parametrize("force", [False, True], ids=["without --force", "with --force"])
def test_concurrent_merges_into_one_out_never_mix(tmp_path: Path, force: bool) -> None:
    pools = {"poolA": _pool(tmp_path / "poolA"), "poolB": _pool(tmp_path / "poolB", first_seed=50)}
    reference = {}
    for name, pool in pools.items():
        ref = _clair("merge", str(pool), "--out", str(tmp_path / f"ref-{name}"), "--exit-zero", "-q")
        assert ref.returncode == 0, ref.stderr
        reference[name] = _merged_from(tmp_path / f"ref-{name}")
    work = tmp_path / "work"
    work.mkdir()
    out, report = work / "merged", work / "report.json"
    extra = ["--force"] if force else []

    def run(name: str) -> subprocess.CompletedProcess[str]:
        args = ["merge", str(pools[name]), "--out", str(out), "--json", str(report), "--exit-zero", "-q"]
        return _clair(*args, *extra)

    for _round in range(3):  # each round: two runs at once into one --out and one --json
        if not force:
            shutil.rmtree(out, ignore_errors=True)
        with ThreadPoolExecutor(2) as ex:
            procs = list(ex.map(run, ["poolA", "poolB"]))
        codes = sorted(p.returncode for p in procs)
        if force:
            assert codes == [0, 0], [p.stderr for p in procs]
        else:
            # Both may see no --out at first; the second to commit must refuse, whole.
            assert codes == [0, 2], [p.stderr for p in procs]
            for p in procs:
                if p.returncode == 2:
                    _one_error_line(p, "already exists")
        winner = _merged_from(out)
        assert winner in reference.values(), winner
        pool = winner.split(":")[0]
        assert winner == reference[pool], "config, tensors and card of one directory come from one run"
        sources = {a["source"] for a in json.loads(report.read_text())["adapters"]}
        assert all(pool in s for s in sources), "the report and the adapter come from the same run"
        assert _no_staging(work) == []


def test_long_output_names_fit_name_max(tmp_path: Path) -> None:
    pool = _pool(tmp_path / "pool")
    out = tmp_path / "out"
    out.mkdir()
    name = "m" * 250  # within NAME_MAX (255); a staging suffix must not push it over
    proc = _clair(
        "merge", str(pool), "--out", str(out / name), "--json", str(out / (name[:245] + ".json")), "--exit-zero", "-q"
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / name / "adapter_model.safetensors").is_file() and (out / (name[:245] + ".json")).is_file()
    assert _no_staging(out) == []


def test_staging_names_are_short_and_cleaned_when_stale(tmp_path: Path) -> None:
    from clair_cli.io.writers import TMP_SUFFIX, clean_stale, stage_stem

    target = tmp_path / ("é" * 120)  # 240 bytes
    stem = stage_stem(target.name)
    assert len(stem.encode()) <= 80 and stem != stage_stem("é" * 119 + "e")
    dead = tmp_path / f".{stem}.999999999.abcd{TMP_SUFFIX}"
    live = tmp_path / f".{stem}.{os.getpid()}.abcd{TMP_SUFFIX}"
    dead.mkdir()
    live.write_text("x")
    clean_stale(target)
    assert live.exists() and not dead.exists()


# --- class 5: exit 2 with one line, never an internal error ----------------------------------


def test_float64_factors_beyond_float32_range_are_audited(tmp_path: Path) -> None:
    # The update fits float32; its factors (c B, A / c) do not.
    for k in range(6):
        t = random_factors(MODULES, seed=k)
        t = {n: v.double() * (1e39 if "lora_A" in n else 1e-39) for n, v in t.items()}
        write_adapter(tmp_path / "pool" / f"a{k}", t)
    proc = _invoke("audit", str(tmp_path / "pool"), "--json", "-", "--exit-zero")
    assert proc.returncode == 0, proc.stderr
    plain = _invoke("audit", str(_pool(tmp_path / "plain")), "--json", "-", "--exit-zero")
    scores = [a["score"] for a in json.loads(proc.stdout)["adapters"]]
    assert scores == pytest.approx([a["score"] for a in json.loads(plain.stdout)["adapters"]], abs=1e-4)


def test_gate_whose_references_are_all_zero(tmp_path: Path) -> None:
    for k in range(6):
        t = random_factors(MODULES, seed=k)
        write_adapter(tmp_path / "refs" / f"r{k}", {n: torch.zeros_like(v) for n, v in t.items()})
    write_adapter(tmp_path / "cand" / "c", random_factors(MODULES, seed=9))
    proc = _invoke("gate", str(tmp_path / "cand"), "--reference", str(tmp_path / "refs"))
    _one_error_line(proc, "reference", "zero")


@pytest.mark.parametrize("where", ["--out", "--out-inside", "--json"])
def test_symlink_loops_in_outputs(tmp_path: Path, where: str) -> None:
    pool = _pool(tmp_path / "pool")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    loop = str(tmp_path / "loop1")
    args = {
        "--out": ["merge", str(pool), "--out", loop],
        "--out-inside": ["merge", str(pool), "--out", loop + "/x"],
        "--json": ["audit", str(pool), "--json", loop + "/r.json"],
    }[where]
    line = _one_error_line(_clair(*args), "loop1")
    assert "symlink loop" in line or "symbolic links" in line, line


def test_an_ascii_terminal_gets_escapes_not_an_error(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    for k in range(6):
        write_adapter(root / f"ädäptér—{k}", random_factors(MODULES, seed=k))
    env = {"PYTHONIOENCODING": "ascii"}
    for args in (["audit", str(root), "--exit-zero"], ["audit", str(root), "--markdown", "-", "--exit-zero"]):
        proc = _clair(*args, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "\\xe4d\\xe4pt\\xe9r" in proc.stdout
    for args in (["inspect", str(root)],):
        proc = _clair(*args, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "\\xe4d\\xe4pt\\xe9r" in proc.stdout
    missing = _clair("audit", str(tmp_path / "nö"), env=env)
    _one_error_line(missing, "n")


def test_weights_whose_sum_overflows(tmp_path: Path) -> None:
    pool = _pool(tmp_path / "pool", n=5)
    for method in ("mean", "clair", "fedavg"):
        out = tmp_path / f"out-{method}"
        proc = _invoke("merge", str(pool), "--out", str(out), "--method", method, "--weights", ",".join(["1e308"] * 5))
        assert proc.returncode in (0, 1), proc.stderr
        if method != "clair":
            assert "| 0.2 |" in (out / "README.md").read_text()  # equal shares


@pytest.mark.parametrize(
    ("option", "value"),
    [("--seed", str(2**70)), ("--seed", "-1"), ("--lora-alpha", "nan"), ("--lora-alpha", "inf"), ("--lora-alpha", "0")],
)
def test_out_of_range_options_are_one_line_naming_the_option(tmp_path: Path, option: str, value: str) -> None:
    pool = _pool(tmp_path / "pool", n=5)
    _one_error_line(_invoke("audit", str(pool), option, value), option)


# --- class 6: Markdown hygiene ------------------------------------------------------------------


HOSTILE_NAMES = ["@org/team", "tick`s``and```more", "<img src=x onerror=alert(1)>", "pipe|cell", "a&amp;b"]


def test_markdown_functions_leave_nothing_active() -> None:
    from clair_cli.report.markdown import WORD_JOINER, md_code, md_fence, md_text

    for name in HOSTILE_NAMES:
        for rendered in (md_code(name), md_text(name), md_fence(name)):
            assert "@org" not in rendered and ("@" not in name or "@" + WORD_JOINER in rendered)
            assert "<img" not in rendered or rendered.startswith("`")
        code = md_code(name)
        fence = code[: len(code) - len(code.lstrip("`"))]
        assert len(fence) > max((len(r) for r in re.findall("`+", name)), default=0), code
        assert "`" * len(fence) not in code[len(fence) : -len(fence)], code
        assert "|" not in code.replace("\\|", "")
        text = md_text(name)
        assert "<" not in text and "|" not in text.replace("\\|", "")


def test_reports_and_cards_escape_hostile_names(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    names = ["@org／team", "tick`name", "pipe|name", "html<b>name", "plain"]  # "／": no "/" in a file name
    for k, name in enumerate(names):
        write_adapter(root / name, random_factors(MODULES, seed=k))
    write_adapter(root / "zz@org", random_factors(MODULES, seed=9))
    md = tmp_path / "r.md"
    proc = _invoke("merge", str(root), "--out", str(tmp_path / "m"), "--markdown", str(md), "--exit-zero", "-q")
    assert proc.returncode == 0, proc.stderr
    for text in (md.read_text(), (tmp_path / "m" / "README.md").read_text()):
        assert "@org" not in text, "an @mention would ping on GitHub"
        assert "html\\<b\\>" not in text and "html<b>name" not in text.replace("`html<b>name`", "")
        assert "`` tick`name ``" in text or "``tick`name``" in text
        assert "pipe\\|name" in text


# --- class 7: verdicts --------------------------------------------------------------------------


def test_an_all_zero_adapter_is_a_flagged_free_rider(tmp_path: Path) -> None:
    root = _pool(tmp_path / "pool", n=8)
    t = random_factors(MODULES, seed=99)
    write_adapter(root / "zero", {n: torch.zeros_like(v) if "lora_B" in n else v for n, v in t.items()})
    proc = _invoke("audit", str(root), "--json", "-")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["flagged"] == ["zero"]
    zero = next(a for a in report["adapters"] if a["name"] == "zero")
    assert [r["rule"] for r in zero["reasons"]] == ["norm"] and "zero" in zero["reasons"][0]["text"]
    assert len(report["adapters"]) == 9
    merged = _invoke("merge", str(root), "--out", str(tmp_path / "m"), "--exit-zero")
    assert merged.returncode == 0 and "merge of 8 of 9" in merged.stderr, merged.stderr


def test_near_copies_are_near_identical_and_say_why_they_are_flagged(tmp_path: Path) -> None:
    root = _pool(tmp_path / "pool", n=8)
    t = random_factors(MODULES, seed=0)
    g = torch.Generator().manual_seed(5)
    t = {n: v * 1.04 + 0.02 * torch.randn(v.shape, generator=g) for n, v in t.items()}
    write_adapter(root / "a0copy", t)
    write_adapter(root / "a1copy", random_factors(MODULES, seed=1))
    report = json.loads(_invoke("audit", str(root), "--json", "-").stdout)
    by_name = {a["name"]: a for a in report["adapters"]}
    near = by_name["a0copy"]
    assert near["flagged"]
    reason = next(r for r in near["reasons"] if r["rule"] == "duplicate")
    assert reason["text"].startswith("near-identical to a0 (cosine 0.99")
    assert "whatever its score" in reason["text"] and 0.999 < reason["value"] < 1
    exact = next(r for r in by_name["a1copy"]["reasons"] if r["rule"] == "duplicate")
    assert exact["text"].startswith("identical to a1")
    for a in report["adapters"]:  # a flag below score 1 comes from a rule without a margin, and says so
        if a["flagged"] and a["score"] <= 1:
            assert all(r["margin"] is None for r in a["reasons"]) and "whatever its score" in a["reasons"][0]["text"]


def test_a_scaled_copy_is_said_as_one_and_a_pool_of_copies_as_copies(tmp_path: Path) -> None:
    """An update sent again x3 was said to be "identical to" the one it scales, and a pool of one update
    at six scales got the notes of a pool whose adapters "agree on no common direction" (a review, 2026-12-07):
    it agrees perfectly; the rules have nothing to compare."""
    root = _pool(tmp_path / "pool", n=7)
    write_adapter(root / "a0x3", {n: v * 3 if "lora_B" in n else v for n, v in random_factors(MODULES, seed=0).items()})
    report = json.loads(_invoke("audit", str(root), "--json", "-").stdout)
    (reason,) = [r for a in report["adapters"] if a["name"] == "a0x3" for r in a["reasons"] if r["rule"] == "duplicate"]
    assert reason["text"].startswith("a scaled copy of a0 (the same direction, 3x its norm; a copy:"), reason["text"]
    assert reason["ratio"] == pytest.approx(3, rel=1e-6)
    one = random_factors(MODULES, seed=3)
    for k, c in enumerate([1, 2, 3, 4, 5, 6]):
        write_adapter(tmp_path / "copies" / f"c{k}", {n: v * c if "lora_B" in n else v for n, v in one.items()})
    report = json.loads(_invoke("audit", str(tmp_path / "copies"), "--json", "-").stdout)
    texts = [r["text"] for a in report["adapters"] for r in a["reasons"]]
    assert len(texts) == 5 and all(t.startswith("a scaled copy of ") for t in texts), texts
    proc = _invoke("audit", str(tmp_path / "copies"))
    text = " ".join(proc.stdout.split())
    assert "only 1 distinct update(s) among 6 adapters, the others copies of them (scaled or not)" in text, text
    assert "agree on no common direction" not in text and "no shared structure" not in text.split("note:", 1)[1]


# --- found by fuzzing (2026-12-04) -------------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("args", [[], ["--json", "-", "-q"]])
def test_a_full_stdout_is_an_output_error_not_a_bug(tmp_path: Path, args: list[str]) -> None:
    pool = _pool(tmp_path / "pool")
    full = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    with open("/dev/full", "w") as sink:
        proc = subprocess.run(
            [sys.executable, "-m", "clair_cli", "audit", str(pool), "--exit-zero", *args],
            stdout=sink,
            stderr=subprocess.PIPE,
            text=True,
            env=full,
            timeout=TIMEOUT,
        )
    _one_error_line(proc, "cannot write the output", "No space left")


@pytest.mark.parametrize("field", ["use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"])
def test_a_boolean_config_field_given_as_a_string_is_refused(tmp_path: Path, field: str) -> None:
    """``bool("false")`` is true: read that way, ``"use_rslora": "false"`` changed the scale."""
    pool = _pool(tmp_path / "pool")
    config = pool / "a0" / "adapter_config.json"
    data = json.loads(config.read_text())
    data[field] = "false"
    config.write_text(json.dumps(data))
    line = _one_error_line(_invoke("inspect", str(pool / "a0")), "adapter_config.json", field, "true or false")
    assert "'false'" in line
    data[field] = None  # null is PEFT's "not set"
    config.write_text(json.dumps(data))
    assert _invoke("inspect", str(pool / "a0"), "-q").returncode == 0


def test_a_pickle_upload_beside_adapters_is_refused_not_skipped(tmp_path: Path) -> None:
    """A directory scan never passes over an upload it will not read; a training run's own
    pickles (beside its adapter files) are not uploads."""
    pool = _pool(tmp_path / "pool")
    (pool / "a1" / "training_args.bin").write_bytes(b"\x80\x04K\x01.")  # beside an adapter: fine
    assert _invoke("audit", str(pool), "-q", "--exit-zero").returncode == 0
    (pool / "upload").mkdir()
    (pool / "upload" / "lora.pt").write_bytes(b"\x80\x04K\x01.")
    _one_error_line(_invoke("audit", str(pool), "-q"), "upload/lora.pt", "pickle checkpoints are never loaded")


def test_an_unreadable_dangling_link_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A link whose target cannot be read (a /proc link, or one removed meanwhile)."""
    from clair_cli.io import files

    link = tmp_path / "gone"
    link.symlink_to(tmp_path / "nowhere")

    def unreadable(path: object) -> str:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(files.os, "readlink", unreadable)
    problem = files.os_problem(FileNotFoundError(errno.ENOENT, "No such file"), link)
    assert problem.message.endswith("gone: is a dangling symlink")


def test_a_replaced_output_that_cannot_be_removed_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--force``: the new output is in place; what could not be removed of the old is named."""
    from clair_cli.io import writers

    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("old")  # an earlier output (--force replaces nothing else)
    monkeypatch.setattr(writers, "_remove", lambda path: None)  # as if nothing could be removed
    with writers.AtomicDir(out, force=True) as staged:
        (staged / "new.txt").write_text("new")
    assert (out / "new.txt").read_text() == "new"
    err = capsys.readouterr().err
    assert err.startswith("warning: the previous") and ".clair-old" in err
    (left,) = [p for p in tmp_path.iterdir() if p.name.endswith(".clair-old")]
    assert (left / "adapter_config.json").read_text() == "old"


@pytest.mark.parametrize(
    "change,words",
    [
        (lambda t, k: t.__setitem__(k, t[k].unsqueeze(-1)), ["lora_A has 3 dimensions and lora_B 2"]),
        (lambda t, k: t.__setitem__(k, t[k].to(torch.float8_e4m3fn)), ["F8_E4M3", "float16, bfloat16"]),
    ],
    ids=["3-D lora_A", "float8"],
)
def test_malformed_factors_are_named_for_what_they_are(tmp_path: Path, change, words: list[str]) -> None:
    tensors = random_factors(MODULES, seed=0)
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    change(tensors, key)
    skip_unless_safetensors_writes(tensors[key].dtype)
    write_adapter(tmp_path / "a", tensors)
    _one_error_line(_invoke("inspect", str(tmp_path / "a")), *words)


def test_clair_s_card_is_recognised_past_a_long_front_matter(tmp_path: Path) -> None:
    """A config's base model (up to its 10 MiB) comes before the card's "Made by clair" line."""
    from clair_cli.io.writers import _clair_card

    card = tmp_path / "README.md"
    card.write_text("---\nbase_model: org/" + "x" * (3 << 20) + "\n---\n\n# Merged\n\nMade by clair 0.1.0.\n")
    assert _clair_card(card)
    card.write_text("---\nbase_model: org/" + "x" * (3 << 20) + "\n---\n\n# Someone's notes\n")
    assert not _clair_card(card)
