"""Hub sources without network: a pre-populated cache offline, and a local fake Hub.

The fake Hub answers the resolve requests huggingface_hub makes (HEAD for
metadata, GET for content) on 127.0.0.1, so the real download path runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import lora_config, run_cli, write_adapter

SHA_MAIN = "a" * 40
SHA_V1 = "b" * 40


def _adapter_files(tmp: Path, seed: int, **cfg: object) -> dict[str, bytes]:
    d = write_adapter(tmp / f"src{seed}", config=lora_config(**cfg), seed=seed)
    return {n: (d / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}


class FakeHub:
    """repos: {repo_id: {revision_or_sha: (sha, {path: bytes})}}"""

    def __init__(self, repos: dict[str, dict[str, tuple[str, dict[str, bytes]]]]) -> None:  # noqa: C901 - its handler
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, body: bool) -> None:
                hub.requests.append((self.command, self.path, self.headers.get("Authorization")))
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "revision":
                    return self._listing("/".join(parts[2:4]), parts[5])
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "RepoNotFound")
                repo, rev, path = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                if repo not in hub.repos:
                    return self._error(401, "RepoNotFound")
                entries = hub.repos[repo]  # a revision, or a commit of one (the Hub resolves either)
                entry = entries.get(rev) or next((e for e in entries.values() if e[0] == rev), None)
                if entry is None:
                    return self._error(404, "RevisionNotFound")
                sha, files = entry
                if path not in files:
                    return self._error(404, "EntryNotFound", sha)
                data = files[path]
                self.send_response(200)
                self.send_header("X-Repo-Commit", sha)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _listing(self, repo: str, rev: str) -> None:
                """model_info's answer: the repo's files at a revision (what diffusers lists to pick a file)."""
                entries = hub.repos.get(repo, {})
                entry = entries.get(rev) or next((e for e in entries.values() if e[0] == rev), None)
                if entry is None:
                    return self._error(404, "RevisionNotFound" if entries else "RepoNotFound")
                sha, files = entry
                body = json.dumps({"id": repo, "sha": sha, "siblings": [{"rfilename": p} for p in sorted(files)]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def _error(self, code: int, error_code: str, sha: str | None = None) -> None:
                self.send_response(code)
                self.send_header("X-Error-Code", error_code)
                if sha:
                    self.send_header("X-Repo-Commit", sha)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _lora_file(modules: tuple[str, ...], parts: tuple[str, str], alpha: float | None, seed: int) -> bytes:
    """A safetensors LoRA file of random 4 x 8 / 8 x 4 factors under ``parts`` (A's and B's names)."""
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in modules:
        tensors[f"{m}.{parts[0]}.weight"] = torch.randn(4, 8, generator=g)
        tensors[f"{m}.{parts[1]}.weight"] = torch.randn(8, 4, generator=g)
        if alpha is not None:
            tensors[f"{m}.alpha"] = torch.tensor(alpha)
    return save(tensors)


def _diffusers_file() -> bytes:
    modules = ("unet.mid_block.attentions.0.proj_in", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj")
    return _lora_file(modules, ("lora_A", "lora_B"), None, 0)


def _comfy_file() -> bytes:
    """A ComfyUI-layout LoRA file, under a community upload's own name."""
    modules = ("diffusion_model.blocks.0.self_attn.q", "diffusion_model.blocks.0.ffn.0")
    return _lora_file(modules, ("lora_down", "lora_up"), 2.0, 1)


def _mlx_files() -> dict[str, bytes]:
    """An MLX-LM adapter repo's files: adapters.safetensors (lora_a in x r, lora_b r x out) and its config."""
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(2)
    tensors = {}
    for m in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        tensors[f"{m}.lora_a"] = torch.randn(8, 4, generator=g)
        tensors[f"{m}.lora_b"] = torch.randn(4, 8, generator=g)
    config = {"model": "org/base", "num_layers": 1, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}}
    return {"adapters.safetensors": save(tensors), "adapter_config.json": json.dumps(config).encode()}


@pytest.fixture()
def fake_hub(tmp_path: Path) -> Iterator[FakeHub]:
    main = _adapter_files(tmp_path, 0, base_model_name_or_path="org/base")
    v1 = _adapter_files(tmp_path, 1, base_model_name_or_path="org/base", lora_alpha=16)
    sub = {f"round_3/{k}": v for k, v in v1.items()}
    repos = {
        "owner/lora": {"main": (SHA_MAIN, {**main, "README.md": b"x"}), SHA_MAIN: (SHA_MAIN, main), "v1": (SHA_V1, v1)},
        "owner/rounds": {"main": (SHA_MAIN, sub)},
        "owner/sdlora": {"main": (SHA_MAIN, {"pytorch_lora_weights.safetensors": _diffusers_file()})},
        "owner/community": {
            "main": (
                SHA_MAIN,
                {
                    "styles/wan_style_v2.safetensors": _comfy_file(),
                    "peft_bare.safetensors": main["adapter_model.safetensors"],
                    "README.md": b"x",
                },
            )
        },
        "owner/mlxlora": {"main": (SHA_MAIN, _mlx_files())},
        "owner/mlxboth": {
            "main": (SHA_MAIN, {**_mlx_files(), "adapter_model.safetensors": main["adapter_model.safetensors"]})
        },
        "owner/pickled": {
            "main": (SHA_MAIN, {"adapter_config.json": main["adapter_config.json"], "adapter_model.bin": b"\x80"})
        },
        "owner/noweights": {"main": (SHA_MAIN, {"adapter_config.json": main["adapter_config.json"]})},
    }
    with FakeHub(repos) as hub:
        yield hub


def _env(hub: FakeHub, home: Path, **extra: str) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def test_download_records_commit_and_fetches_only_adapter_files(fake_hub: FakeHub, tmp_path: Path) -> None:
    proc = run_cli("inspect", "owner/lora", "hf://owner/lora@v1", "--json", "-", env=_env(fake_hub, tmp_path / "home"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    names = [a["name"] for a in report["adapters"]]
    assert names == ["owner/lora", "owner/lora@v1"]
    assert [a["revision"] for a in report["adapters"]] == [SHA_MAIN, SHA_V1]
    assert [a["lora_alpha"] for a in report["adapters"]] == [8.0, 16.0]
    assert [a["hub"] for a in report["adapters"]] == [
        {"repo_id": "owner/lora", "revision": None, "subfolder": None, "commit": SHA_MAIN},
        {"repo_id": "owner/lora", "revision": "v1", "subfolder": None, "commit": SHA_V1},
    ]
    assert all(len(digest) == 64 for a in report["adapters"] for digest in a["sha256"].values())
    fetched = {path.rsplit("/", 1)[-1] for _, path, _ in fake_hub.requests}
    assert fetched == {"adapter_config.json", "adapter_model.safetensors"}


def test_subfolder_in_spec_and_option(fake_hub: FakeHub, tmp_path: Path) -> None:
    env = _env(fake_hub, tmp_path / "home")
    for args in (["hf://owner/rounds/round_3"], ["owner/rounds", "--subfolder", "round_3"]):
        proc = run_cli("inspect", *args, "--json", "-", env=env)
        assert proc.returncode == 0, proc.stderr
        (adapter,) = json.loads(proc.stdout)["adapters"]
        assert adapter["name"] == "owner/rounds/round_3" and adapter["revision"] == SHA_MAIN


def test_a_repo_folder_named_like_a_cache_snapshot_is_read_at_the_commit_the_hub_answered(tmp_path: Path) -> None:
    """The commit of a download is read from its cache path (``models--o--n/snapshots/<commit>/...``); a
    repo folder ``snapshots/<40 hex>`` after it was taken for the commit, and the weights were asked for
    at that commit (an error: the Hub has no such revision)."""
    other = "c" * 40
    files = {f"snapshots/{other}/{k}": v for k, v in _adapter_files(tmp_path, 0).items()}
    with FakeHub({"owner/nested": {"main": (SHA_MAIN, files)}}) as hub:
        proc = run_cli("inspect", f"hf://owner/nested/snapshots/{other}", "--json", "-", env=_env(hub, tmp_path / "h"))
    assert proc.returncode == 0, proc.stderr
    (adapter,) = json.loads(proc.stdout)["adapters"]
    assert adapter["revision"] == SHA_MAIN
    assert adapter["hub"]["commit"] == SHA_MAIN and adapter["hub"]["subfolder"] == f"snapshots/{other}"


def test_token_is_sent(fake_hub: FakeHub, tmp_path: Path) -> None:
    proc = run_cli("inspect", "owner/lora", env=_env(fake_hub, tmp_path / "home", HF_TOKEN="hf_secret"))
    assert proc.returncode == 0, proc.stderr
    assert all(auth == "Bearer hf_secret" for _, _, auth in fake_hub.requests)


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_second_run_offline_uses_the_cache(fake_hub: FakeHub, tmp_path: Path, variable: str) -> None:
    """Either variable puts huggingface_hub offline (TRANSFORMERS_OFFLINE where HF_HUB_OFFLINE is unset):
    clair reads the cache then, a diffusers repo included, without listing it."""
    env = _env(fake_hub, tmp_path / "home")
    for repo in ("owner/lora", "owner/sdlora"):
        assert run_cli("inspect", repo, env=env).returncode == 0
    n = len(fake_hub.requests)
    for repo in ("owner/lora", "owner/sdlora"):
        proc = run_cli("inspect", repo, "--json", "-", env={**env, variable: "1"})
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["adapters"][0]["revision"] == SHA_MAIN
    assert len(fake_hub.requests) == n
    proc = run_cli("inspect", "owner/rounds", "--subfolder", "round_3", env={**env, variable: "1"})
    assert proc.returncode == 2 and f"{variable} is set" in proc.stderr


def test_offline_variables_read_as_huggingface_hub_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from clair_cli.io.hub import offline_variable

    for hf, tf, want in [
        (None, None, None),
        ("1", None, "HF_HUB_OFFLINE"),
        ("true", None, "HF_HUB_OFFLINE"),
        (None, "yes", "TRANSFORMERS_OFFLINE"),
        ("", "1", "TRANSFORMERS_OFFLINE"),  # empty: huggingface_hub reads the other
        ("0", "1", None),  # set: the other is not read
    ]:
        for name, value in (("HF_HUB_OFFLINE", hf), ("TRANSFORMERS_OFFLINE", tf)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        assert offline_variable() == want, (hf, tf)


def test_a_diffusers_lora_repo_is_read_from_its_weights_file(fake_hub: FakeHub, tmp_path: Path) -> None:
    env = _env(fake_hub, tmp_path / "home")
    proc = run_cli("inspect", "owner/sdlora", "--json", "-", env=env)
    assert proc.returncode == 0, proc.stderr
    (adapter,) = json.loads(proc.stdout)["adapters"]
    assert adapter["layout"] == "diffusers" and adapter["revision"] == SHA_MAIN and adapter["n_modules"] == 2
    fetched = {path.rsplit("/", 1)[-1] for _, path, _ in fake_hub.requests if not path.startswith("/api/")}
    assert fetched == {"adapter_config.json", "pytorch_lora_weights.safetensors"}
    # and its list of files, to tell that diffusers' load_lora_weights(repo) loads that file
    assert f"/api/models/owner/sdlora/revision/{SHA_MAIN}" in {path for _, path, _ in fake_hub.requests}
    n = len(fake_hub.requests)
    proc = run_cli("inspect", "owner/sdlora", "--json", "-", env={**env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["adapters"][0]["layout"] == "diffusers" and len(fake_hub.requests) == n


def test_an_mlx_lm_adapter_repo_is_read_from_its_adapters_file(fake_hub: FakeHub, tmp_path: Path) -> None:
    env = _env(fake_hub, tmp_path / "home")
    proc = run_cli("inspect", "owner/mlxlora", "--json", "-", env=env)
    assert proc.returncode == 0, proc.stderr
    (adapter,) = json.loads(proc.stdout)["adapters"]
    assert adapter["layout"] == "mlx" and adapter["revision"] == SHA_MAIN and adapter["n_modules"] == 2
    assert adapter["lora_alpha"] == 40.0 and adapter["base_model"] == "org/base"
    fetched = {path.rsplit("/", 1)[-1] for _, path, _ in fake_hub.requests}
    assert fetched == {"adapter_config.json", "adapters.safetensors"}  # the config is MLX-LM's
    n = len(fake_hub.requests)
    proc = run_cli("inspect", "owner/mlxlora", "--json", "-", env={**env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["adapters"][0]["layout"] == "mlx" and len(fake_hub.requests) == n


def test_an_mlx_lm_repo_with_a_peft_weights_file_too_is_read_as_its_config_says(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    proc = run_cli("inspect", "owner/mlxboth", "--json", "-", env=_env(fake_hub, tmp_path / "home"))
    assert proc.returncode == 0, proc.stderr
    (adapter,) = json.loads(proc.stdout)["adapters"]
    assert adapter["layout"] == "mlx" and adapter["lora_alpha"] == 40.0


def test_one_lora_file_of_a_repo_is_named_in_the_source(fake_hub: FakeHub, tmp_path: Path) -> None:
    """``hf://owner/name/[folder/]file.safetensors``: that file alone is downloaded and read as a bare
    weights file is (a diffusion LoRA needs no config; a PEFT file needs --lora-alpha)."""
    env = _env(fake_hub, tmp_path / "home")
    spec = "hf://owner/community/styles/wan_style_v2.safetensors"
    proc = run_cli("inspect", spec, "--json", "-", env=env)
    assert proc.returncode == 0, proc.stderr
    (adapter,) = json.loads(proc.stdout)["adapters"]
    assert adapter["layout"] == "comfyui" and adapter["n_modules"] == 2 and adapter["revision"] == SHA_MAIN
    assert adapter["name"] == "owner/community/styles/wan_style_v2.safetensors"
    assert {path for _, path, _ in fake_hub.requests} == {
        "/owner/community/resolve/main/styles/wan_style_v2.safetensors"
    }
    proc = run_cli("inspect", "hf://owner/community/peft_bare.safetensors", env=env)
    assert proc.returncode == 2 and "--lora-alpha" in proc.stderr, proc.stderr
    proc = run_cli("inspect", "hf://owner/community/peft_bare.safetensors", "--lora-alpha", "8", "--json", "-", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["adapters"][0]["layout"] == "peft"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("hf://owner/community/nope.safetensors", "owner/community has no nope.safetensors"),
        ("hf://owner/community/model.ckpt", "is a pickle file (refused)"),
        ("owner/missing", "hub repo owner/missing not found"),
        ("owner/lora@nope", "revision 'nope' not found"),
        ("owner/pickled", "has adapter_config.json but no adapter_model.safetensors"),
        ("owner/noweights", "has adapter_config.json but no adapter_model.safetensors"),
        ("owner/rounds", "has no adapter_config.json"),
    ],
)
def test_hub_errors_exit_2(fake_hub: FakeHub, tmp_path: Path, spec: str, message: str) -> None:
    proc = run_cli("inspect", spec, env=_env(fake_hub, tmp_path / "home"))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.splitlines()[0]


def test_a_peft_repo_without_weights_is_not_said_to_hold_a_pickle(fake_hub: FakeHub, tmp_path: Path) -> None:
    """A repo with a PEFT adapter_config.json and no weights file at all: the message says which file is missing,
    not that a pickle checkpoint was refused (the repo has none); the pickle advice stays in the hint."""
    proc = run_cli("inspect", "owner/noweights", env=_env(fake_hub, tmp_path / "home"))
    assert proc.returncode == 2, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert "owner/noweights" in first and "no adapter_model.safetensors" in first, proc.stderr
    assert "pickle" not in first, proc.stderr
    assert "adapter_model.bin" in proc.stderr


def _populate_cache(home: Path, repo: str, sha: str, files: dict[str, bytes]) -> None:
    root = home / "hub" / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    snap = root / "snapshots" / sha
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def test_prepopulated_cache_offline(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _populate_cache(home, "owner/cached", SHA_V1, _adapter_files(tmp_path, 3))
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = run_cli("inspect", "owner/cached", "--json", "-", env=env)
    assert proc.returncode == 0, proc.stderr
    (adapter,) = json.loads(proc.stdout)["adapters"]
    assert adapter["revision"] == SHA_V1 and adapter["name"] == "owner/cached"
    proc = run_cli("inspect", "owner/not-cached", env=env)
    assert proc.returncode == 2
    assert "not in the local cache" in proc.stderr
    # A local path with a typo (no ./owner here) reads as a hub id: the message says so.
    assert "No local path owner/not-cached exists, so it was read as a Hub repo id" in " ".join(proc.stderr.split())
    proc = run_cli("inspect", "hf://owner/not-cached", env=env)
    assert proc.returncode == 2 and "No local path" not in proc.stderr


def test_audit_json_records_hub_coordinates_and_digests(fake_hub: FakeHub, tmp_path: Path) -> None:
    import hashlib

    for k in range(3):
        write_adapter(tmp_path / "local" / f"c{k}", config=lora_config(base_model_name_or_path="org/base"), seed=5 + k)
    env = _env(fake_hub, tmp_path / "home")
    proc = run_cli(
        "audit", "owner/lora", "hf://owner/lora@v1", str(tmp_path / "local"), "--json", "-", "--exit-zero", env=env
    )
    assert proc.returncode == 0, proc.stderr
    by_name = {a["name"]: a for a in json.loads(proc.stdout)["adapters"]}
    v1 = by_name["owner/lora@v1"]
    assert v1["hub"] == {"repo_id": "owner/lora", "revision": "v1", "subfolder": None, "commit": SHA_V1}
    assert v1["path"] is None and by_name["owner/lora"]["hub"]["revision"] is None
    files = _adapter_files(tmp_path, 1, base_model_name_or_path="org/base", lora_alpha=16)
    assert v1["sha256"] == {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}


def test_revision_and_token_options(fake_hub: FakeHub, tmp_path: Path) -> None:
    env = _env(fake_hub, tmp_path / "home", HF_TOKEN="hf_from_env")
    proc = run_cli(
        "inspect", "owner/lora", "owner/lora@main", "--revision", "v1", "--token", "hf_given", "--json", "-", env=env
    )
    assert proc.returncode == 0, proc.stderr
    adapters = json.loads(proc.stdout)["adapters"]
    # --revision applies to the source that names none; a revision in the source wins.
    assert [(a["name"], a["revision"]) for a in adapters] == [("owner/lora@v1", SHA_V1), ("owner/lora@main", SHA_MAIN)]
    assert {auth for _, _, auth in fake_hub.requests} == {"Bearer hf_given"}  # --token wins over HF_TOKEN
    assert "hf_given" not in proc.stdout + proc.stderr


def test_hub_options_reach_the_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plumbing without any server: the download function is replaced; the token reaches it alone."""
    import huggingface_hub
    from typer.testing import CliRunner

    from clair_cli.cli import app

    src = write_adapter(tmp_path / "src", config=lora_config(base_model_name_or_path="org/base"))
    calls: list[dict[str, object]] = []

    def download(repo_id: str, filename: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, "filename": filename, **kwargs})
        return str(src / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    runner = CliRunner()
    out = tmp_path / "merged"
    args = ["merge", "owner/lora", "--method", "mean", "--out", str(out), "--revision", "v2", "--token", "hf_secret"]
    monkeypatch.setattr("sys.argv", ["clair", *args])
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {(c["revision"], c["token"], c["subfolder"]) for c in calls} == {("v2", "hf_secret", None)}
    assert "hf_secret" not in result.output
    card = (out / "README.md").read_text()
    assert "hf_secret" not in card and "--token '***'" in card
    calls.clear()
    result = runner.invoke(app, ["inspect", "hf://owner/lora@v1", "--revision", "v2"])
    assert result.exit_code == 0, result.output
    assert {(c["revision"], c["token"]) for c in calls} == {("v1", None)}  # None: HF_TOKEN, as huggingface_hub reads it
    bad = runner.invoke(app, ["inspect", "owner/lora", "--revision", "../x"])
    assert bad.exit_code == 2 and "is not a branch, tag or commit sha" in bad.output


def test_the_weights_come_from_the_commit_of_the_config(fake_hub: FakeHub, tmp_path: Path) -> None:
    """A branch that moves between the two downloads would pair one commit's config with another's
    weights (a review, 2026-12-06): the weights are asked for at the config's commit."""
    proc = run_cli("inspect", "owner/lora@v1", env=_env(fake_hub, tmp_path / "home"))
    assert proc.returncode == 0, proc.stderr
    gets = [path for method, path, _ in fake_hub.requests if method == "GET"]
    assert any(p.endswith("/resolve/v1/adapter_config.json") for p in gets), gets
    assert any(p.endswith(f"/resolve/{SHA_V1}/adapter_model.safetensors") for p in gets), gets


def test_a_file_larger_than_its_bound_is_refused_before_it_is_downloaded(tmp_path: Path) -> None:
    """An adapter_config.json the Hub announces at 40 GB (and would send endlessly) fills no disk:
    a config is bounded by 10 MiB, any file by 32 GiB."""
    files = _adapter_files(tmp_path, 0)
    files["adapter_config.json"] = files["adapter_config.json"] + b" " * (10 * 2**20)
    with FakeHub({"owner/big": {"main": (SHA_MAIN, files)}}) as hub:
        proc = run_cli("inspect", "owner/big", env=_env(hub, tmp_path / "home"))
    assert proc.returncode == 2, proc.stderr
    assert "clair accepts at most 10485760" in proc.stderr
    assert not list((tmp_path / "home").rglob("adapter_config.json"))


def _inspect_at_status_server(
    tmp_path: Path, source: str, status: int, headers: dict[str, str], extra_env: dict[str, str]
) -> subprocess.CompletedProcess:
    """``clair inspect SOURCE`` against a local Hub that answers every request with ``status`` and ``headers``."""

    class Answering(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:  # noqa: N802
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD  # noqa: N815

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answering)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {
            "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
            "HF_HOME": str(tmp_path / "home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            **extra_env,
        }
        return run_cli("inspect", source, env=env)
    finally:
        server.shutdown()
        server.server_close()


def test_a_rate_limited_download_says_so(tmp_path: Path) -> None:
    """A Hub answering 429 with a long Retry-After ran out the deadline as a 'slow or stalled' Hub."""

    proc = _inspect_at_status_server(
        tmp_path,
        "owner/busy",
        429,
        {"Retry-After": "999999"},
        {"CLAIR_HUB_TIMEOUT": "8"},  # the first answer comes long before, even on a busy machine
    )
    assert proc.returncode == 2, proc.stderr
    assert "rate-limits these requests (429 Too Many Requests, Retry-After 999999)" in proc.stderr


@pytest.mark.parametrize("gap", [0.2, 1000.0], ids=["trickling", "silent"])
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_download_leaves_no_partial_file(tmp_path: Path, gap: float, sig: int, code: int) -> None:
    """Ctrl-C or SIGTERM during a download left huggingface_hub's ``<etag>.<random>.incomplete``
    in the cache: named per process, nothing ever resumed or removed it. The download is stopped
    at its next piece (a trickling Hub) or, blocked in a read (a silent one), its open file removed."""
    data = b"x" * 4000

    class Slow(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(self, body: bool) -> None:
            self.send_response(200)
            self.send_header("X-Repo-Commit", SHA_MAIN)
            self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            with contextlib.suppress(OSError):
                for byte in data if body else b"":
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(gap)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._answer(body=True)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    home = tmp_path / "home"
    env = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
    }
    script = (  # Ctrl-C as in a terminal: a background job (CI's) inherits SIGINT ignored
        "import signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from clair_cli.__main__ import run\n"
        "sys.argv = ['clair', 'inspect', 'owner/slow']\n"
        "run()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):  # the download has begun once its partial file exists (a minute at most)
            if list(home.rglob("*.incomplete")) or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert list(home.rglob("*.incomplete")), "the download never started"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        server.shutdown()
        server.server_close()
    assert proc.returncode == code, err
    assert "Interrupted: no output was written." in err
    assert not list(home.rglob("*.incomplete"))


def test_a_ctrl_c_that_does_not_wake_the_waiting_thread_still_ends_the_download() -> None:
    """A signal handled on another thread than the main one (or just before the main thread blocks)
    does not interrupt the main thread's wait: CPython runs the KeyboardInterrupt only once that
    thread is back in Python. Waiting for the whole download at once, a Ctrl-C left `clair inspect`
    waiting for the download to end in 2 of 131 runs of the interrupted-download test above,
    looped beside other tests; the main thread now waits in short slices."""
    script = (
        "import signal, sys, threading, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from clair_cli.io import hub\n"
        "def download():\n"
        "    time.sleep(1)  # the main thread is waiting by now\n"
        "    signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # handled here, not in the main thread\n"
        "    time.sleep(120)\n"
        "start = time.monotonic()\n"
        "try:\n"
        "    hub._with_deadline(time.monotonic() + 300, download, 'owner/slow')\n"
        "except KeyboardInterrupt:\n"
        "    print(f'{time.monotonic() - start:.1f}')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr
    # A second, a slice and the 2 s given to a stopped download (3 s); waiting out the download took 121 s.
    assert float(proc.stdout) < 60, proc.stdout


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="open files are found through /proc/self/fd")
def test_a_stopped_download_removes_its_own_partial_file_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped download blocked in a read: its partial file is removed, not another thread's of
    this process (a review: a library caller fetching two sources at once lost the healthy one)."""
    from huggingface_hub import constants

    from clair_cli.io import hub

    blobs = tmp_path / "models--o--n" / "blobs"
    blobs.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    mine, other = blobs / "aaa111.0f0f0f0f.incomplete", blobs / "bbb222.1e1e1e1e.incomplete"
    with mine.open("wb"), other.open("wb"):
        hub._remove_open_partials({"aaa111"})
        assert not mine.exists() and other.exists()


def test_xet_transfers_are_off_so_every_bound_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    """hf_xet's transfers pass no HTTP hook: clair's deadline, size bounds and stop would not reach
    them (a review), so its process fetches hub files over HTTP."""
    from huggingface_hub import constants
    from huggingface_hub.utils._runtime import is_xet_available

    from clair_cli.io import hub

    monkeypatch.setattr(hub, "_installed", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    hub._guard_client()
    assert constants.HF_HUB_DISABLE_XET and not is_xet_available()


def test_huggingface_hub_uri_spellings_are_read_as_huggingface_hub_reads_them(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    """huggingface_hub's own hf:// URIs, hf://[TYPE/]owner/name[@REV][/PATH], read the repo, revision and folder
    they name (a review, 2026-12-07: hf://models/owner/name read the repo "models/owner", hf://owner/name@v1/sub
    asked for a revision "v1/sub"); a dataset or Space is refused before any request."""
    from clair_cli.errors import UsageError
    from clair_cli.io.hub import parse_hub_spec

    for spec, want in [
        ("hf://models/owner/lora", ("owner/lora", None, None, None)),
        ("hf://owner/rounds@v1/round_3", ("owner/rounds", "v1", "round_3", None)),
        ("hf://models/owner/rounds@v1/round_3/", ("owner/rounds", "v1", "round_3", None)),
        ("hf://owner/r@v2/styles/wan.safetensors", ("owner/r", "v2", "styles", "wan.safetensors")),
        ("hf://owner/r@refs/pr/3/sub", ("owner/r", "refs/pr/3", "sub", None)),
        ("hf://owner/r@feature%2Fx/sub", ("owner/r", "feature/x", "sub", None)),
        # clair's own order, and the bare form, read as before
        ("hf://owner/r/sub@feature/x", ("owner/r", "feature/x", "sub", None)),
        ("owner/r@feature/x", ("owner/r", "feature/x", None, None)),
    ]:
        hub = parse_hub_spec(spec)
        assert (hub.repo_id, hub.revision, hub.subfolder, hub.filename) == want, spec
    for spec in (
        "hf://owner/lora@..%2F..",
        "hf://owner/r@v1/../x",
        "hf://owner/r@v1/x.safetensors@v2",
        "hf://datasets/owner/lora",
        "hf://spaces/a/b",
    ):
        with pytest.raises(UsageError):
            parse_hub_spec(spec)
    env = _env(fake_hub, tmp_path / "home")
    proc = run_cli("inspect", "hf://models/owner/lora@v1", "hf://owner/rounds@main/round_3", "--json", "-", env=env)
    assert proc.returncode == 0, proc.stderr
    adapters = json.loads(proc.stdout)["adapters"]
    assert [(a["name"], a["revision"]) for a in adapters] == [
        ("owner/lora@v1", SHA_V1),
        ("owner/rounds/round_3@main", SHA_MAIN),
    ]
    n = len(fake_hub.requests)
    proc = run_cli("inspect", "hf://datasets/owner/lora", env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "names a dataset repo" in proc.stderr.splitlines()[0] and len(fake_hub.requests) == n
    proc = run_cli("inspect", "hf://owner/lora@nope/x", env=env)
    assert proc.returncode == 2 and "revision 'nope' not found in owner/lora" in proc.stderr
    assert "%2F" in proc.stderr  # how to write a branch whose name holds a '/'


@pytest.mark.parametrize(
    ("status", "said"),
    [
        (401, "refused the request for adapter_config.json of owner/private (401 Unauthorized)"),
        (403, "refused the request for adapter_config.json of owner/private (403 Forbidden)"),
        (400, "refused the request for adapter_config.json of owner/private (400 Bad Request)"),
    ],
)
def test_a_hub_error_status_is_said_as_the_hub_answered_it(tmp_path: Path, status: int, said: str) -> None:
    """A Hub that answers 403 (a token without access to the repo) was said not to be reachable, with a hint
    to check the network (a review, 2026-12-07): huggingface_hub raises LocalEntryNotFoundError from the answer."""

    proc = _inspect_at_status_server(tmp_path, "hf://owner/private", status, {}, {"HF_TOKEN": "hf_not_to_be_shown"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "hf_not_to_be_shown" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert said in first and "cannot be reached" not in proc.stderr, proc.stderr
    assert "token" in proc.stderr.lower() or status == 400


def test_an_egress_limit_is_said_with_the_hubs_message(tmp_path: Path) -> None:
    """A Hub that answers 402 to an account past its download allowance (X-Error-Code EgressLimitReached):
    huggingface_hub 2.5 raises EgressLimitError (2.4 a LocalEntryNotFoundError from the answer, which lost the
    Hub's message), and the hint said to check the source and HF_ENDPOINT, neither of which is wrong."""
    usage = "You have downloaded 10.2 TB over the last 30 days, compared to your account's allowance of 10 TB."
    headers = {"X-Error-Code": "EgressLimitReached", "X-Error-Message": usage}
    proc = _inspect_at_status_server(tmp_path, "hf://owner/big", 402, headers, {})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert f"refused the request for adapter_config.json of owner/big (402 Payment Required): {usage}" in first
    text = " ".join(proc.stderr.split())
    assert "download (egress) allowance" in text and "Check the source" not in text, proc.stderr
    assert not list((tmp_path / "home").rglob("*.incomplete"))


def test_a_diffusers_repo_is_read_at_the_commit_that_has_no_config(tmp_path: Path) -> None:
    """The branch moves after the Hub answered that it has no adapter_config.json, to a commit of a PEFT
    adapter: its pytorch_lora_weights.safetensors was read as the repo's diffusers LoRA, and recorded at that
    commit (a review, 2026-12-07). The weights are asked for at the commit the answer was of."""
    peft = _adapter_files(tmp_path, 0, base_model_name_or_path="org/base")
    old = {"pytorch_lora_weights.safetensors": _diffusers_file()}
    new = {**peft, "pytorch_lora_weights.safetensors": _comfy_file()}
    repos = {"owner/moving": {"main": (SHA_MAIN, old), SHA_MAIN: (SHA_MAIN, old), SHA_V1: (SHA_V1, new)}}

    class Moving(list):  # type: ignore[type-arg]
        def append(self, item: tuple[str, str, str | None]) -> None:
            super().append(item)
            if item[1].endswith("/pytorch_lora_weights.safetensors"):  # main moves on
                repos["owner/moving"]["main"] = (SHA_V1, new)

    with FakeHub(repos) as hub:
        hub.requests = Moving()
        proc = run_cli("inspect", "owner/moving", "--json", "-", env=_env(hub, tmp_path / "home"))
    assert proc.returncode == 0, proc.stderr
    (adapter,) = json.loads(proc.stdout)["adapters"]
    assert adapter["revision"] == SHA_MAIN and adapter["layout"] == "diffusers" and adapter["n_modules"] == 2
    gets = [path for method, path, _ in hub.requests if method == "GET"]
    assert f"/owner/moving/resolve/{SHA_MAIN}/pytorch_lora_weights.safetensors" in gets, gets


def test_a_repo_of_adapters_in_folders_names_them(tmp_path: Path) -> None:
    """A repo with one adapter per folder and none at its top: the error names the folders to read."""
    files = _adapter_files(tmp_path, 0)
    repo = {f"round_{k}/{name}": data for k in (1, 2) for name, data in files.items()}
    with FakeHub({"owner/rounds": {"main": (SHA_MAIN, {**repo, "README.md": b"x"})}}) as hub:
        proc = run_cli("inspect", "hf://owner/rounds@main", env=_env(hub, tmp_path / "home"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "has no adapter_config.json" in proc.stderr.splitlines()[0]
    text = " ".join(proc.stderr.split())
    assert "It holds adapters in 2 folders (round_1, round_2)" in text and "hf://owner/rounds/round_1@main" in text


def test_a_listing_the_hub_refuses_says_its_status_and_message(tmp_path: Path) -> None:
    """The file listing of a diffusers LoRA repo (which file diffusers loads) refused with a 402 at the egress
    limit was said as "402 Client Error." under huggingface_hub 2.5 (EgressLimitError's first line; 2.4's named
    the URL): without the status's reason or the Hub's message."""
    files = {"pytorch_lora_weights.safetensors": _diffusers_file()}
    hub = FakeHub({"owner/sdlora": {"main": (SHA_MAIN, files)}})

    def refuse(handler: BaseHTTPRequestHandler, repo: str, rev: str) -> None:
        handler.send_response(402)
        handler.send_header("X-Error-Code", "EgressLimitReached")
        handler.send_header("X-Error-Message", "Egress allowance reached")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    hub.server.RequestHandlerClass._listing = refuse  # type: ignore[attr-defined]
    with hub:
        proc = run_cli("inspect", "owner/sdlora", env=_env(hub, tmp_path / "home"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert "the files of owner/sdlora cannot be listed (402 Payment Required: Egress allowance reached)" in first


def test_a_branch_read_from_the_cache_because_the_hub_did_not_answer_says_so(fake_hub: FakeHub, tmp_path: Path) -> None:
    """Online, a Hub that does not answer lets huggingface_hub read the commit the cache last saw for the
    branch, which may be behind it: that was silent (a review, 2026-12-07); a note says so. A pinned commit,
    and an answered request, have none."""
    env = _env(fake_hub, tmp_path / "home")
    proc = run_cli("inspect", "owner/lora", "--json", "-", env=env)
    assert proc.returncode == 0, proc.stderr
    assert not any("did not answer" in n for n in json.loads(proc.stdout)["adapters"][0]["notes"])
    away = {**env, "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there
    proc = run_cli("inspect", "owner/lora", f"owner/lora@{SHA_MAIN}", "--json", "-", env=away)
    assert proc.returncode == 0, proc.stderr
    branch, pinned = json.loads(proc.stdout)["adapters"]
    assert branch["revision"] == SHA_MAIN
    (note,) = [n for n in branch["notes"] if "did not answer" in n]
    assert f"read the cached commit {SHA_MAIN} of main" in note and "may have moved on" in note
    assert not any("did not answer" in n for n in pinned["notes"])


def test_a_branch_read_from_the_cache_after_an_error_status_says_what_the_hub_answered(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    """huggingface_hub reads the branch's cached commit after an error status too (402 at the egress limit, 5xx):
    the note said that the Hub "did not answer", which it did."""
    proc = run_cli("inspect", "owner/lora", env=_env(fake_hub, tmp_path / "home"))
    assert proc.returncode == 0, proc.stderr
    proc = _inspect_at_status_server(tmp_path, "owner/lora", 402, {"X-Error-Code": "EgressLimitReached"}, {})
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split() + proc.stderr.split())
    assert "the Hub answered 402 Payment Required for adapter_config.json of owner/lora" in text, text
    assert f"read the cached commit {SHA_MAIN} of main" in text and "did not answer" not in text


@pytest.mark.parametrize("installed", ["0.36.2", "1.33.0"])
def test_an_older_huggingface_hub_is_named_not_an_internal_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, installed: str
) -> None:
    """huggingface_hub 0.36 (which transformers 4 pins, and pip kept under the old bound, >=0.23) has
    no set_client_factory: a Hub source ended in "internal error (ImportError ...)". It is refused
    before any download, naming the version installed and the one needed (pyproject declares it)."""
    import huggingface_hub
    from typer.testing import CliRunner

    from clair_cli.cli import app
    from clair_cli.io.hub import HUB_MIN_VERSION

    monkeypatch.setattr(huggingface_hub, "__version__", installed)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing is asked of it
    result = CliRunner().invoke(app, ["inspect", "hf://owner/lora"])
    assert result.exit_code == 2, result.output
    assert f"huggingface_hub {installed} is installed" in result.output
    assert f"{HUB_MIN_VERSION} or later" in result.output and "internal error" not in result.output
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*.safetensors"))
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'"huggingface-hub>={HUB_MIN_VERSION}"' in pyproject
