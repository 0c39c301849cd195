"""A differential review of hub and local-directory sources: what PEFT (or diffusers) loads from a repo
or folder against what clair reads from it. Each case below was a silent divergence: clair audited
another file, another folder or another base model than the loader would use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import lora_config, run_cli, write_adapter
from test_hub import SHA_MAIN, FakeHub, _adapter_files, _diffusers_file, _env, _populate_cache

from clair_cli.errors import AdapterFormatError, IncompatibleAdapters, UsageError
from clair_cli.io import SourceOptions, open_adapters
from clair_cli.io.sources import resolve_sources
from clair_cli.pipeline import build_pool

NAME = "pytorch_lora_weights.safetensors"


def _payload() -> bytes:
    """The diffusers file with its lora_B factors 1000 times larger."""
    tensors = safetensors.torch.load(_diffusers_file())
    return safetensors.torch.save({k: v * 1000 if "lora_B" in k else v for k, v in tensors.items()})


def test_a_diffusers_directory_with_another_file_diffusers_may_load_is_refused(tmp_path: Path) -> None:
    """diffusers' load_lora_weights(DIR) loads the first entry of os.listdir whose name ends with
    pytorch_lora_weights.safetensors; clair read pytorch_lora_weights.safetensors itself (a review: diffusers
    loaded v2_pytorch_lora_weights.safetensors, 1000 times larger, from the folder clair passed)."""
    from diffusers.loaders.lora_base import _best_guess_weight_name

    directory = tmp_path / "style"
    directory.mkdir()
    (directory / NAME).write_bytes(_diffusers_file())
    (directory / f"v2_{NAME}").write_bytes(_payload())
    assert _best_guess_weight_name(str(directory)) in {NAME, f"v2_{NAME}"}  # the file system's order decides
    with pytest.raises(AdapterFormatError, match=r"holds 2 files that diffusers' load_lora_weights may load"):
        open_adapters([str(directory)])
    (adapter,) = open_adapters([str(directory / NAME)])  # the file named: that file alone
    assert adapter.ref.weights_file == directory / NAME
    # diffusers skips names with "checkpoint", "scheduler" or "optimizer": no rival
    (directory / f"v2_{NAME}").rename(directory / f"checkpoint_{NAME}")
    (adapter,) = open_adapters([str(directory)])
    assert adapter.ref.weights_file == directory / NAME


def test_a_diffusers_hub_repo_with_another_file_diffusers_may_load_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the Hub diffusers lists the whole repo (model_info's siblings, subfolders included) and loads the first
    path that ends with pytorch_lora_weights.safetensors."""
    from diffusers.loaders import lora_base
    from huggingface_hub.hf_api import ModelInfo

    files = {NAME: _diffusers_file(), f"a/{NAME}": _payload(), f"checkpoint-5/{NAME}": _payload()}
    siblings = [{"rfilename": p} for p in sorted(files)]  # the Hub lists a repo's files sorted
    monkeypatch.setattr(lora_base, "model_info", lambda repo: ModelInfo(id=repo, siblings=siblings))
    assert lora_base._best_guess_weight_name("owner/two") == f"a/{NAME}"  # not the root file clair read
    ok = {NAME: _diffusers_file(), f"checkpoint-5/{NAME}": _payload(), f"b/{NAME}": _payload()}
    with FakeHub({"owner/two": {"main": (SHA_MAIN, files)}, "owner/ok": {"main": (SHA_MAIN, ok)}}) as hub:
        env = _env(hub, tmp_path / "home")
        proc = run_cli("inspect", "owner/two", env=env)
        assert proc.returncode == 2, proc.stderr
        assert "holds 2 files that diffusers' load_lora_weights may load" in proc.stderr
        assert f"a/{NAME}" in proc.stderr and "Traceback" not in proc.stderr
        proc = run_cli("inspect", f"hf://owner/two/{NAME}", "--json", "-", env=env)  # the file named: read
        assert proc.returncode == 0, proc.stderr
        # a subfolder source is checked among that folder's files: b/ holds one
        proc = run_cli("inspect", "hf://owner/ok/b", "--json", "-", env=env)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["adapters"][0]["layout"] == "diffusers"


def test_offline_a_repo_whose_config_is_not_cached_is_not_read_as_a_diffusers_lora(tmp_path: Path) -> None:
    """Offline, a repo whose cache holds its pytorch_lora_weights.safetensors but not its adapter_config.json
    (diffusers fetched that file alone) was read as a diffusers LoRA; the repo may be a PEFT adapter, whose
    adapter_model.safetensors PeftModel.from_pretrained loads (and clair online read)."""
    home = tmp_path / "home"
    _populate_cache(home, "owner/both", SHA_MAIN, {NAME: _diffusers_file()})
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = run_cli("inspect", "owner/both", env=env)
    assert proc.returncode == 2, proc.stdout
    assert "cannot be told whether the repo is a PEFT adapter" in " ".join(proc.stderr.split())
    proc = run_cli("inspect", f"hf://owner/both/{NAME}", "--json", "-", env=env)  # the file named: read
    assert proc.returncode == 0, proc.stderr
    # Where the cache records that the repo has no config (the Hub said so once), it is a diffusers repo.
    marker = home / "hub" / "models--owner--both" / ".no_exist" / SHA_MAIN / "adapter_config.json"
    marker.parent.mkdir(parents=True)
    marker.touch()
    proc = run_cli("inspect", "owner/both", "--json", "-", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["adapters"][0]["layout"] == "diffusers"


def test_adapters_for_different_revisions_of_one_base_model_are_refused(tmp_path: Path) -> None:
    """adapter_config.json's revision is the base model's revision, at which AutoPeftModel loads the base model
    (peft.auto: base_model_revision = peft_config.revision); clair pooled such adapters as of one base model."""
    from peft import PeftConfig

    pool = tmp_path / "pool"
    for i in range(3):
        write_adapter(pool / f"c{i}", config=lora_config(revision="v2" if i == 0 else None), seed=i)
    assert PeftConfig.from_pretrained(str(pool / "c0")).revision == "v2"
    with pytest.raises(IncompatibleAdapters, match="different revisions of the base model"):
        build_pool(open_adapters([str(pool)]), method="mean")
    # "main" is PEFT's and transformers' default: the same revision as none
    (pool / "c0" / "adapter_config.json").write_text(json.dumps(lora_config(revision="main")))
    build_pool(open_adapters([str(pool)]), method="mean")
    # --base-model names the base model of every source, revision included
    (pool / "c0" / "adapter_config.json").write_text(json.dumps(lora_config(revision="v2")))
    adapters = open_adapters([str(pool)], SourceOptions(base_model="clair-test/tiny-base"))
    build_pool(adapters, method="mean")
    assert any("revision 'v2'" in n for n in adapters[0].notes)
    (pool / "c0" / "adapter_config.json").write_text(json.dumps(lora_config(revision=3)))
    with pytest.raises(AdapterFormatError, match="revision"):
        open_adapters([str(pool)])


@pytest.mark.parametrize("revision", ["v2", None])
def test_a_merge_is_written_for_its_inputs_base_model_revision(tmp_path: Path, revision: str | None) -> None:
    """AutoPeftModel loads the base model at the config's revision: a merge of adapters for revision v2 says
    v2 (it said nothing, so the merged adapter loaded onto the base model's main)."""
    from peft import PeftConfig

    pool = tmp_path / "pool"
    for i in range(5):
        write_adapter(pool / f"c{i}", config=lora_config(revision=revision), seed=i)
    proc = run_cli("merge", str(pool), "--out", str(tmp_path / "out"), "--method", "mean", "--exit-zero")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["revision"] == revision
    assert PeftConfig.from_pretrained(str(tmp_path / "out")).revision == revision


def test_subfolder_is_not_ignored_for_a_local_source(tmp_path: Path) -> None:
    """PeftModel.from_pretrained(base, DIR, subfolder=SUB) loads DIR/SUB; clair read DIR and dropped --subfolder,
    also for a Hugging Face cache snapshot named as a hub repo."""
    from peft import PeftConfig

    repo = write_adapter(tmp_path / "repo", config=lora_config(), seed=0)
    write_adapter(repo / "x", config=lora_config(lora_alpha=800), seed=1)
    assert PeftConfig.from_pretrained(str(repo), subfolder="x").lora_alpha == 800
    with pytest.raises(UsageError, match="--subfolder 'x' applies to hub sources"):
        resolve_sources([str(repo)], SourceOptions(subfolder="x"))
    (ref,) = resolve_sources([str(repo / "x")])
    assert ref.config_file == repo / "x" / "adapter_config.json"
    home = tmp_path / "home"
    _populate_cache(home, "owner/cached", SHA_MAIN, _adapter_files(tmp_path, 3))
    snapshot = home / "hub" / "models--owner--cached" / "snapshots" / SHA_MAIN
    with pytest.raises(UsageError, match="applies to hub sources"):
        resolve_sources([str(snapshot)], SourceOptions(subfolder="x"))


def test_a_peft_config_beside_a_diffusers_file_is_not_applied_to_it(tmp_path: Path) -> None:
    """A folder of a PEFT adapter_config.json and pytorch_lora_weights.safetensors (no adapter_model.safetensors):
    clair read the file at the config's alpha / r, while PeftModel.from_pretrained loads no weights from it and
    diffusers' load_lora_weights reads the file without the config, at scale 1 (a config of lora_alpha 0.004
    shrank clair's update 1000 times below the one diffusers applies). A hub repo so laid out was refused."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    directory = tmp_path / "style"
    directory.mkdir()
    (directory / NAME).write_bytes(_payload())
    config = lora_config(r=4, lora_alpha=0.004, target_modules=["proj_in", "q_proj"])
    (directory / "adapter_config.json").write_text(json.dumps(config))
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(directory))
    assert alphas is None and state.keys() == safetensors.torch.load(_payload()).keys()  # the file as stored
    with pytest.raises(AdapterFormatError, match="PeftModel.from_pretrained loads no weights from it"):
        open_adapters([str(directory)])
    config.pop("peft_type")  # the directory is refused first, whatever its config says
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match="PeftModel.from_pretrained loads no weights from it"):
        open_adapters([str(directory)])
    (directory / "adapter_config.json").unlink()  # a diffusers LoRA: read at diffusers' scale
    (adapter,) = open_adapters([str(directory)])
    assert adapter.config.file_name is None


def test_two_commits_of_one_hub_repo_in_a_cache_scan_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scan of a Hugging Face cache (or of one repo's folder in it) read the snapshots of two commits of one
    repo as two independent adapters (PEFT loads one revision): one upload weighed twice, as two checkpoint-N
    folders of one run would be."""
    from huggingface_hub import constants

    home = tmp_path / "home"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))  # the cache in use: snapshots named by repo
    _populate_cache(home, "owner/lora", SHA_MAIN, _adapter_files(tmp_path, 0))
    _populate_cache(home, "owner/other", SHA_MAIN, _adapter_files(tmp_path, 2))
    root = home / "hub" / "models--owner--lora"
    later = root / "snapshots" / ("b" * 40)
    later.mkdir()
    for name, data in _adapter_files(tmp_path, 1, lora_alpha=16).items():
        (later / name).write_bytes(data)
    for source in (root, home / "hub"):
        with pytest.raises(AdapterFormatError, match="snapshots of 2 commits of the hub repo owner/lora"):
            resolve_sources([str(source)])
    errors: list = []
    assert [r.name for r in resolve_sources([str(home / "hub")], errors=errors)] == [f"owner/other@{SHA_MAIN[:12]}"]
    assert [e[0] for e in errors] == ["owner/lora"]
    (ref,) = resolve_sources([str(later)])  # one snapshot named: read
    assert ref.revision == "b" * 40


def _flux2_peft(directory: Path, factor: float = 1.0, lora_alpha: float = 2) -> dict[str, bytes]:
    """A Flux.2 transformer's PEFT adapter (its lora_B factors times ``factor``); its files by name."""
    from test_diffusion_differential import FLUX2, _peft_adapter

    _peft_adapter(directory, FLUX2, lora_alpha=lora_alpha)
    weights = directory / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    safetensors.torch.save_file({k: v * factor if "lora_B" in k else v for k, v in tensors.items()}, weights)
    return {n: (directory / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}


def test_a_diffusion_peft_adapter_directory_with_another_file_diffusers_may_load_is_refused(tmp_path: Path) -> None:
    """Without a weight_name, diffusers' load_lora_weights(DIR) loads the first .safetensors entry of os.listdir,
    which Flux.2's loader reads as PEFT-format weights as readily as adapter_model.safetensors; clair read
    adapter_model.safetensors (a review: a folder where ext4 listed lora.safetensors first, whose factors were 1000
    times larger, applied an update 1000 times the one clair audited)."""
    from diffusers.loaders import Flux2LoraLoaderMixin
    from diffusers.loaders.lora_base import _best_guess_weight_name
    from helpers import transformer_lora_deltas
    from test_diffusion_differential import _tiny_flux2

    directory = tmp_path / "flux2"
    _flux2_peft(directory)
    _flux2_peft(tmp_path / "payload", factor=1000)
    (directory / "lora.safetensors").write_bytes((tmp_path / "payload" / "adapter_model.safetensors").read_bytes())
    assert _best_guess_weight_name(str(directory)) in {"adapter_model.safetensors", "lora.safetensors"}
    ours = {m.name: m.delta_weight() for m in open_adapters([str(directory / "adapter_model.safetensors")])[0].load()}
    theirs = transformer_lora_deltas(Flux2LoraLoaderMixin, _tiny_flux2(), directory / "lora.safetensors")
    for name, delta in ours.items():  # what diffusers applies where the file system lists lora.safetensors first
        torch.testing.assert_close(delta * 1000, theirs[name], rtol=1e-5, atol=1e-3)
    with pytest.raises(AdapterFormatError, match=r"beside 1 other file that diffusers' load_lora_weights may load"):
        open_adapters([str(directory)])
    proc = run_cli("inspect", str(tmp_path))  # a scan too, with the file named
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "lora.safetensors" in proc.stderr
    # The file named: read, with the config beside it.
    (adapter,) = open_adapters([str(directory / "adapter_model.safetensors")])
    assert adapter.config.file_name == "adapter_config.json"
    # A pytorch_lora_weights.safetensors beside it is what diffusers loads, whatever the order.
    (directory / "lora.safetensors").rename(directory / NAME)
    assert _best_guess_weight_name(str(directory)) == NAME
    with pytest.raises(AdapterFormatError, match=rf"\({NAME}\)"):
        open_adapters([str(directory)])
    # diffusers skips names with "checkpoint", "scheduler" or "optimizer": no rival.
    (directory / NAME).rename(directory / "checkpoint.safetensors")
    assert _best_guess_weight_name(str(directory)) == "adapter_model.safetensors"
    (adapter,) = open_adapters([str(directory)])
    assert adapter.ref.weights_file == directory / "adapter_model.safetensors"


def test_an_llms_peft_adapter_directory_with_another_safetensors_file_is_read(tmp_path: Path) -> None:
    # No diffusers loader reads an LLM's adapter: the file beside it is no rival to PeftModel.from_pretrained's.
    directory = write_adapter(tmp_path / "llm", config=lora_config(), seed=0)
    (directory / "model.safetensors").write_bytes(_payload())
    (adapter,) = open_adapters([str(directory)])
    assert adapter.ref.weights_file == directory / "adapter_model.safetensors"


def test_a_peft_config_beside_an_adapters_safetensors_is_not_applied_to_it(tmp_path: Path) -> None:
    """A folder of a PEFT adapter_config.json and adapters.safetensors (MLX-LM's file name) in PEFT's layout, no
    adapter_model.safetensors: clair read the file at the config's alpha / r (a hub repo so laid out was refused),
    while PeftModel.from_pretrained loads no weights from it and diffusers' Flux.2 loader reads the file without
    the config, at scale 1 (a config of lora_alpha 0.25 at r 2: clair's update 8 times below diffusers')."""
    from diffusers.loaders import Flux2LoraLoaderMixin
    from diffusers.loaders.lora_base import _best_guess_weight_name
    from helpers import transformer_lora_deltas
    from test_diffusion_differential import _tiny_flux2

    directory = tmp_path / "flux2"
    _flux2_peft(directory, lora_alpha=0.25)
    (directory / "adapter_model.safetensors").rename(directory / "adapters.safetensors")
    assert _best_guess_weight_name(str(directory)) == "adapters.safetensors"
    theirs = transformer_lora_deltas(Flux2LoraLoaderMixin, _tiny_flux2(), directory / "adapters.safetensors")
    ours = {m.name: m.delta_weight() for m in open_adapters([str(directory / "adapters.safetensors")])[0].load()}
    for name, delta in ours.items():
        torch.testing.assert_close(delta * 8, theirs[name], rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterFormatError, match="PeftModel.from_pretrained loads no weights from it"):
        open_adapters([str(directory)])


def test_a_diffusion_peft_adapter_hub_repo_with_another_file_diffusers_may_load_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the Hub diffusers lists the repo (model_info's siblings, sorted) and loads the first .safetensors file:
    a.safetensors before adapter_model.safetensors, which clair read without listing the repo."""
    from diffusers.loaders import lora_base
    from huggingface_hub.hf_api import ModelInfo

    files = _flux2_peft(tmp_path / "src")
    payload = _flux2_peft(tmp_path / "payload", factor=1000)["adapter_model.safetensors"]
    two = {**files, "a.safetensors": payload}
    siblings = [{"rfilename": p} for p in sorted(two)]
    monkeypatch.setattr(lora_base, "model_info", lambda repo: ModelInfo(id=repo, siblings=siblings))
    assert lora_base._best_guess_weight_name("owner/two") == "a.safetensors"
    ok = {**files, "checkpoint-5/a.safetensors": payload}
    repos = {"owner/two": {"main": (SHA_MAIN, two)}, "owner/ok": {"main": (SHA_MAIN, ok)}}
    with FakeHub(repos) as hub:
        env = _env(hub, tmp_path / "home")
        proc = run_cli("inspect", "owner/two", "owner/ok", env=env)
        assert proc.returncode == 2, proc.stderr
        assert "beside 1 other file that diffusers' load_lora_weights may load (a.safetensors)" in proc.stderr
        assert "owner/ok" not in proc.stderr and "Traceback" not in proc.stderr
        proc = run_cli("inspect", "owner/ok", "--json", "-", env=env)
        assert proc.returncode == 0, proc.stderr
        assert f"/api/models/owner/ok/revision/{SHA_MAIN}" in {path for _, path, _ in hub.requests}


def test_a_folder_laid_out_as_a_cache_snapshot_is_the_hub_repo_only_in_the_cache_in_use(tmp_path: Path) -> None:
    """A local folder ``.../models--owner--name/snapshots/<commit>/`` was reported as that hub repo at that
    commit wherever it lay (its name, the JSON's revision and hub block, a huggingface.co link in SARIF), though
    anyone can make one (a review: an upload unpacked as models--meta-llama--... was gated as meta-llama's
    commit). Only in the Hugging Face cache in use does a hub source of that commit read the same files."""
    from huggingface_hub import try_to_load_from_cache

    home, upload = tmp_path / "home", tmp_path / "upload"
    files = _adapter_files(tmp_path, 9)
    files["adapter_model.safetensors"] = safetensors.torch.save(
        {
            k: v * 100 if "lora_B" in k else v
            for k, v in safetensors.torch.load(files["adapter_model.safetensors"]).items()
        }
    )
    for root in (home, upload):
        _populate_cache(root, "meta-llama/Llama-3.1-8B", SHA_MAIN, files)
    refs = [str(write_adapter(tmp_path / "refs" / f"r{k}", seed=k)) for k in range(8)]
    for root, in_use in ((upload, False), (home, True)):
        snap = root / "hub" / "models--meta-llama--Llama-3.1-8B" / "snapshots" / SHA_MAIN
        hub_reads = try_to_load_from_cache(
            "meta-llama/Llama-3.1-8B", "adapter_model.safetensors", cache_dir=home / "hub", revision=SHA_MAIN
        )  # what the hub source of that commit reads with HF_HOME=home, offline
        assert (hub_reads == str(snap / "adapter_model.safetensors")) == in_use
        env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
        proc = run_cli(
            "gate", str(snap), *sum((["-r", r] for r in refs), []), "--json", "-", "--sarif",
            str(tmp_path / "g.sarif"), "--device", "cpu", env=env,
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr  # flagged: its updates are 100 times the references'
        (candidate,) = [a for a in json.loads(proc.stdout)["adapters"] if a["role"] == "candidate"]
        sarif = (tmp_path / "g.sarif").read_text()
        said = [n for n in candidate["notes"] if "laid out as the Hugging Face cache snapshot" in n]
        if in_use:
            assert candidate["name"] == f"meta-llama/Llama-3.1-8B@{SHA_MAIN[:12]}" and candidate["revision"] == SHA_MAIN
            assert candidate["hub"]["repo_id"] == "meta-llama/Llama-3.1-8B" and candidate["hub"]["commit"] == SHA_MAIN
            assert "huggingface.co/meta-llama/Llama-3.1-8B/blob/" in sarif and not said
        else:
            assert "meta-llama" not in candidate["name"] and candidate["revision"] is None
            assert candidate["hub"] is None and candidate["path"] == str(snap)
            assert "huggingface.co" not in sarif and snap.as_uri() in sarif
            assert said and "outside the cache in use" in said[0] and SHA_MAIN in said[0]


def test_bare_files_in_a_snapshot_of_the_cache_in_use_are_not_said_to_lie_outside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bare ``.safetensors`` files of a snapshot (a directory source of several LoRA files, read with
    --lora-alpha) are recorded as local paths wherever the snapshot lies; inside the Hugging Face cache in use
    each was still noted as "a local folder laid out as the Hugging Face cache snapshot ... outside the cache in
    use", which it is not. The note is for a folder outside that cache alone."""
    from huggingface_hub import constants

    weights = Path(__file__).resolve().parent.parent / "sample_adapters"
    for root, in_use in ((tmp_path / "cache", True), (tmp_path / "upload", False)):
        snap = root / "models--acme--loras" / "snapshots" / SHA_MAIN
        snap.mkdir(parents=True)
        for k in (1, 2):
            source = weights / f"client_0{k}" / "adapter_model.safetensors"
            (snap / f"c{k}.safetensors").write_bytes(source.read_bytes())
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        adapters = open_adapters([str(snap)], SourceOptions(lora_alpha=8.0))
        assert sorted(a.name for a in adapters) == ["c1", "c2"]
        for adapter in adapters:
            said = [n for n in adapter.notes if "laid out as the Hugging Face cache snapshot" in n]
            assert bool(said) == (not in_use), (in_use, adapter.notes)
