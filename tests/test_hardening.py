"""Issue #14 on runs that succeed: what clair writes stays in its place, carries no injected
text, honours the umask, and a merge of adapters with a head either refuses or loads in PEFT."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import MODULES, invoke_cli, lora_config, random_factors, write_adapter

from clair_cli.io.paths import join_inside, printable, safe_relpath
from clair_cli.report.markdown import md_code, yaml_string


def _pool(root: Path, n: int = 5, **cfg: object) -> Path:
    for k in range(n):
        write_adapter(root / f"a{k}", random_factors(MODULES, seed=k), lora_config(**cfg))
    return root


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(
    "name, expected",
    [
        ("..", "__"),
        ("a/../../b", "a/__/__/b"),
        ("/etc/x", "etc/x"),
        ("", "adapter"),
        ("a\nb\x1b", "a_b_"),
        (".", "adapter"),
    ],
)
def test_names_become_safe_relative_paths(name: str, expected: str, tmp_path: Path) -> None:
    assert safe_relpath(name) == expected
    assert join_inside(tmp_path, safe_relpath(name)).resolve().is_relative_to(tmp_path.resolve())


def test_refine_of_a_file_named_dots_writes_only_inside_out(tmp_path: Path) -> None:
    pool = _pool(tmp_path / "pool")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(pool / "a0" / "adapter_config.json", bare / "adapter_config.json")
    torch_file = bare / "...safetensors"
    write_adapter(tmp_path / "tmp5", random_factors(MODULES, seed=5))
    shutil.copy(tmp_path / "tmp5" / "adapter_model.safetensors", torch_file)
    shutil.rmtree(tmp_path / "tmp5")
    (tmp_path / "out").mkdir()
    before = _tree(tmp_path)
    proc = invoke_cli("refine", str(pool), str(torch_file), "--out", str(tmp_path / "out" / "refined"), "--exit-zero")
    assert proc.returncode == 0, proc.stderr
    new = _tree(tmp_path) - before
    assert new and all(p.startswith("out") for p in new), sorted(new)
    assert (tmp_path / "out" / "refined" / "__" / "adapter_model.safetensors").is_file()


def test_markup_in_the_out_path_is_printed_as_is(tmp_path: Path) -> None:
    out = tmp_path / "x[bold]y[red]"
    proc = invoke_cli("merge", str(_pool(tmp_path / "pool")), "--out", str(out), "--method", "mean")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stderr


def test_model_card_yaml_cannot_be_injected_by_the_base_model(tmp_path: Path) -> None:
    base = "org/base\nevil_key: true\n---\n# injected"
    pool = _pool(tmp_path / "pool", base_model_name_or_path=base)
    proc = invoke_cli("merge", str(pool), "--out", str(tmp_path / "m"), "--method", "mean")
    assert proc.returncode == 0, proc.stderr
    card = (tmp_path / "m" / "README.md").read_text()
    front = card.split("---\n")[1]
    assert f"base_model: {yaml_string(base)}" in front.splitlines()
    assert not any(line.startswith("evil_key") for line in card.splitlines())
    assert "\n# injected" not in card


def test_markdown_code_spans_hold_backticks_and_pipes() -> None:
    assert md_code("a`b") == "``a`b``"
    assert md_code("`x|y") == "`` `x\\|y ``"
    assert printable("a\x1b[2Jb\nc") == "a\\x1b[2Jb\\nc"


def test_names_cannot_reorder_or_hide_what_a_report_shows() -> None:
    """A right-to-left override shows ``client_\u202e31`` as ``client_13``; a zero-width space
    makes two names look alike. Both are escaped; other non-ASCII text is kept."""
    assert printable("client_\u202e31") == "client_\\u202e31"
    assert printable("a\u2066b\u2069c\u200fd") == "a\\u2066b\\u2069c\\u200fd"
    assert printable("a\u200bb\ufeff") == "a\\u200bb\\ufeff"
    assert printable("café ✓ 模型") == "café ✓ 模型"


def test_pr_comment_escapes_adapter_names(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    for k, name in enumerate(["a`b", "c|d", "e<img>", "f", "g"]):
        write_adapter(pool / name, random_factors(MODULES, seed=k))
    md = tmp_path / "r.md"
    proc = invoke_cli("audit", str(pool), "--markdown", str(md), "--exit-zero")
    assert proc.returncode == 0, proc.stderr
    text = md.read_text()
    assert "| ``a`b`` |" in text and "| `c\\|d` |" in text and "| `e<img>` |" in text


def test_outputs_honour_the_umask(tmp_path: Path) -> None:
    pool = _pool(tmp_path / "pool")
    code = "import os, sys; os.umask(0o022); from clair_cli.__main__ import run; sys.argv[0] = 'clair'; run()"
    args = ["merge", str(pool), "--out", str(tmp_path / "m"), "--json", str(tmp_path / "r.json"), "--exit-zero"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "m").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "m" / "adapter_model.safetensors").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == 0o644


def test_a_closed_stdout_pipe_ends_quietly(tmp_path: Path) -> None:
    pool = _pool(tmp_path / "pool")
    proc = subprocess.Popen(
        [sys.executable, "-m", "clair_cli", "inspect", str(pool), "--json", "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # the reader went away before clair wrote
    _, stderr = proc.communicate(timeout=300)
    assert b"Traceback" not in stderr and b"Exception ignored" not in stderr
    assert proc.returncode in (0, 141)


def test_inspect_shows_every_good_adapter_and_an_error_row(tmp_path: Path) -> None:
    pool = _pool(tmp_path / "pool", n=4)
    (pool / "a2" / "adapter_model.safetensors").write_bytes(b"garbage")
    proc = invoke_cli("inspect", str(pool))
    assert proc.returncode == 2
    rows = {line.split("│")[1].strip() for line in proc.stdout.splitlines() if line.startswith("│")}
    assert {"a0", "a1", "a3", "a2"} <= rows
    assert "error:" in proc.stdout
    assert proc.stderr.startswith("Error: 1 of 4 adapters cannot be read")


def test_unreadable_member_of_a_directory_source_is_an_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every directory")
    pool = _pool(tmp_path / "pool")
    (pool / "locked").mkdir()
    (pool / "locked").chmod(0)
    try:
        proc = invoke_cli("audit", str(pool))
    finally:
        (pool / "locked").chmod(0o755)
    assert proc.returncode == 2 and "locked" in proc.stderr.splitlines()[0]


def test_rank_pattern_matching_is_peft_s(tmp_path: Path) -> None:
    from clair_cli.types import AdapterConfig

    cfg = AdapterConfig(r=4, rank_pattern={"layers.0.self_attn.q_proj": 2, r"layers\.1\..*v_proj": 6})
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert cfg.rank_for("model.xlayers.0.self_attn.q_proj") == 4  # a dotted suffix, as PEFT
    assert cfg.rank_for("model.layers.1.self_attn.v_proj") == 6
    assert cfg.rank_for("model.layers.2.self_attn.v_proj") == 4


# --- merges of classifier adapters (modules_to_save) in PEFT --------------------------------


@pytest.fixture(scope="module")
def seq_cls_pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    transformers = pytest.importorskip("transformers")
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("seqcls")
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, num_labels=3, pad_token_id=0
    )
    torch.manual_seed(0)
    base = transformers.GPT2ForSequenceClassification(config)
    base.save_pretrained(root / "base")
    for k in range(5):
        torch.manual_seed(k + 1)
        model = transformers.GPT2ForSequenceClassification.from_pretrained(root / "base")
        lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
        peft_model = get_peft_model(model, lora)
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        peft_model.save_pretrained(root / "pool" / f"client_{k}")
        cfg_path = root / "pool" / f"client_{k}" / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str(root / "base")
        cfg_path.write_text(json.dumps(cfg))
    return root / "base", root / "pool"


def test_merge_of_classifiers_refuses_to_drop_the_head_silently(
    seq_cls_pool: tuple[Path, Path], tmp_path: Path
) -> None:
    _, pool = seq_cls_pool
    proc = invoke_cli("merge", str(pool), "--out", str(tmp_path / "m"), "--method", "mean")
    assert proc.returncode == 2
    first = proc.stderr.splitlines()[0]
    assert "client_0" in first and "modules_to_save" in first and "--drop-extras" in proc.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("method", ["mean", "clair"])
def test_merge_with_drop_extras_loads_in_peft(seq_cls_pool: tuple[Path, Path], tmp_path: Path, method: str) -> None:
    import transformers
    from peft import PeftModel

    base_dir, pool = seq_cls_pool
    out = tmp_path / "m"
    proc = invoke_cli("merge", str(pool), "--out", str(out), "--method", method, "--drop-extras", "--exit-zero")
    assert proc.returncode == 0, proc.stderr
    assert "dropped (--drop-extras)" in (out / "README.md").read_text()
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] is None
    base = transformers.GPT2ForSequenceClassification.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, out)
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 3) and bool(torch.isfinite(logits).all())


def test_tensors_are_read_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A single read() stops at 2 GiB; the reader loops. A 7-byte chunk exercises the loop.
    from safetensors.torch import load_file

    import clair_cli.io.files as files
    from clair_cli.io.safetensors_file import SafetensorsReader

    d = write_adapter(tmp_path / "a", random_factors(MODULES, seed=3))
    monkeypatch.setattr(files, "READ_CHUNK", 7)
    expected = load_file(d / "adapter_model.safetensors")
    with SafetensorsReader(d / "adapter_model.safetensors") as reader:
        for key, value in expected.items():
            assert torch.equal(reader.get(key), value)


def test_a_full_disk_is_exit_2_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import safetensors.torch
    from typer.testing import CliRunner

    from clair_cli.cli import app

    def full(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    from clair_cli.io.safetensors_stream import SafetensorsStream

    pool = _pool(tmp_path / "pool")
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(safetensors.torch, "save_file", full)  # refine's adapters
    monkeypatch.setattr(SafetensorsStream, "add", full)  # merge streams its tensors
    for command in ("merge", "refine"):
        method = ["--method", "mean"] if command == "merge" else []
        result = CliRunner().invoke(app, [command, str(pool), "--out", str(tmp_path / "out" / "m"), *method])
        assert result.exit_code == 2, result.output
        assert "no space left on the device" in result.stderr
        # The error names the output given, not the staging directory it was written into.
        assert f"Error: {tmp_path / 'out' / 'm'}" in result.stderr and ".clair-tmp" not in result.stderr
        assert list((tmp_path / "out").iterdir()) == []


def test_the_pickle_hint_never_pastes_a_hostile_name_into_a_shell_command() -> None:
    from clair_cli.constants import pickle_hint

    assert "torch.load('model.ckpt'" in pickle_hint("model.ckpt") and "'model.safetensors'" in pickle_hint("model.ckpt")
    for hostile in ("x$(rm -rf ~).pt", "a'b.bin", 'a"b.pt', "`id`.ckpt", "-rf.pt", "a b.pth"):
        hint = pickle_hint(hostile)
        assert hostile not in hint and "torch.load('FILE" in hint


@pytest.mark.parametrize(
    "dtype",
    [torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64, torch.int16, torch.bool],
    ids=str,
)
def test_every_dtype_is_read_in_slices_as_safetensors_reads_it(tmp_path: Path, dtype: torch.dtype) -> None:
    """float8 and unsigned wide tensors went through safetensors whole (a scan of a large one held
    it all); they are read straight from the file, in slices, with safetensors' values bit for bit."""
    from helpers import skip_unless_safetensors_writes
    from safetensors.torch import load_file, save_file

    import clair_cli.io.safetensors_file as stf

    skip_unless_safetensors_writes(dtype)
    values = torch.randn(3, 1000) * 100
    tensor = (
        values > 0
        if dtype == torch.bool
        else values.abs().to(dtype)
        if dtype.is_floating_point
        else (values.abs().to(torch.int64).to(dtype))
    )
    save_file({"t": tensor}, tmp_path / "f.safetensors")
    expected = load_file(tmp_path / "f.safetensors")["t"]
    with stf.SafetensorsReader(tmp_path / "f.safetensors") as reader:
        assert stf._torch_dtype(reader.tensors["t"].dtype) == dtype
        whole = reader.get("t")
        pieces = list(reader.chunks("t", chunk_bytes=1000))
    assert whole.dtype == dtype and torch.equal(whole.view(torch.uint8), expected.view(torch.uint8))
    assert len(pieces) == math.ceil(tensor.numel() * tensor.element_size() / 1000)
    assert torch.equal(torch.cat(pieces).view(torch.uint8), expected.reshape(-1).view(torch.uint8))


def test_windows_gets_a_message_not_a_traceback() -> None:
    # clair's writers need POSIX file locks (fcntl): outside POSIX the command says so, exit 2,
    # and the library's writers fail to import with the same words instead of "No module named fcntl".
    code = "import os, sys; from clair_cli.__main__ import run; sys.argv[0] = 'clair'; os.name = 'nt'; run()"
    proc = subprocess.run([sys.executable, "-c", code, "--version"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "Error: clair runs on Linux and macOS (POSIX systems); on Windows, run it under WSL 2"
    code = "import sys; sys.modules['fcntl'] = None; import clair_cli.io.writers"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "ImportError: clair runs on Linux and macOS" in proc.stderr
