"""The README.md model card of convert and export folders: front matter from what the source states, numbers equal
to upcycle.json's, verify figures when given, and a training summary whose held-out losses are metrics.jsonl's."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from train_helpers import local_paths_in, recipe_dict

from upcycle.convert import UpcycleOptions
from upcycle.errors import SourceError
from upcycle.model_card import rewrite_conversion_card
from upcycle.model_identity import read_front_matter, source_identity
from upcycle.train.export import export_checkpoint
from upcycle.train.loop import train
from upcycle.train.metrics import read_metrics
from upcycle.train.recipe import recipe_from_dict
from upcycle.upcycling import convert

SOURCE_README = (
    "---\nlicense: apache-2.0\nmodel_name: tiny-org/tiny-llama\nbase_model: someone/its-parent\n---\n# Tiny\n"
)


def front_matter(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    matter = read_front_matter(folder / "README.md")
    assert matter == yaml.safe_load(text.split("---\n")[1])
    return matter


def table(folder: Path) -> dict[str, str]:
    """The card's two-column rows, key -> value."""
    rows = re.findall(r"^\| ([^|]+?) \| (.+?) \|$", (folder / "README.md").read_text(), re.MULTILINE)
    return {key: value for key, value in rows if key.strip()}


def held_out_rows(folder: Path) -> list[tuple[int, float]]:
    text = (folder / "README.md").read_text()
    return [(int(step), float(loss)) for step, loss in re.findall(r"^\| (\d+) \| ([0-9.]+) \|$", text, re.MULTILINE)]


def dense_with_readme(dense: Path, tmp_path: Path, readme: str | None) -> Path:
    """A copy of a shared dense fixture, so that adding its README does not touch the session's folder."""
    folder = tmp_path / "dense"
    shutil.copytree(dense, folder)
    if readme is not None:
        (folder / "README.md").write_text(readme)
    return folder


@pytest.mark.parametrize(
    "options, readme",
    [
        (dict(experts=4, top_k=2), SOURCE_README),
        (dict(experts=4, granularity=2, top_k=4, layers="1-2"), None),
        (dict(experts=4, top_k=2, router="softmax-topk", drop_upcycling=0.5), None),
    ],
    ids=["exact-with-license", "virtual-groups-some-layers", "approximate"],
)
def test_conversion_writes_a_card_matching_upcycle_json(dense_dir, tmp_path, options, readme):
    dense = dense_with_readme(dense_dir("llama"), tmp_path, readme)
    out = tmp_path / "tiny-moe"
    convert(dense, out, UpcycleOptions(**options))
    record = json.loads((out / "upcycle.json").read_text())
    matter = front_matter(out)
    assert matter["library_name"] == "transformers" and matter["pipeline_tag"] == "text-generation"
    assert {"upcycle", "moe", "upcycled"} <= set(matter["tags"])
    if readme is None:  # nothing names the tiny model nor licenses it: omitted, not invented
        assert "base_model" not in matter and "license" not in matter
        assert "name" not in record["source"] and "license" not in record["source"]
    else:  # the source's own name, not its README's base_model (the source's parent)
        assert matter["base_model"] == record["source"]["name"] == "tiny-org/tiny-llama"
        assert matter["license"] == record["source"]["license"] == "apache-2.0"
    rows = table(out)
    opts = record["options"]
    assert rows["Target class"] == f"`{record['architecture']}`"
    assert rows["Experts"].startswith(f"{opts['experts'] * opts['granularity']} ")
    assert f"E = {opts['experts']}, G = {opts['granularity']}" in rows["Experts"]
    assert rows["Experts per token (top-k)"] == str(opts["top_k"])
    assert rows["dtype"] == record["dtype"] and rows["Method"] == record["exactness"]["method"]
    layers = record["moe_layers"]
    assert rows["MoE layers"].startswith("all 3 (0-2)" if len(layers) == 3 else "1-2 of 3 layers")
    text = (out / "README.md").read_text()
    assert ("**Exact by design**" in text) is record["exactness"]["exact"]
    assert all(note in text for note in record["exactness"]["notes"])
    assert f'from_pretrained("{out.name}")' in text and "trust_remote_code" not in text
    assert "Not verified" in text


def test_gguf_metadata_and_config_name_the_source(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("Tiny: Llama #1")  # YAML would misread this unquoted
    writer.add_license("mit")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    folder = tmp_path / "folder"
    folder.mkdir()
    assert source_identity(folder, path) == {"name": "Tiny: Llama #1", "license": "mit"}
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "/home/someone/models/llama"}))
    assert source_identity(folder) == {}  # a local path names no model
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "org/model-1b"}))
    (folder / "README.md").write_text("---\nlicense: other\nlicense_name: custom\n---\n")
    assert source_identity(folder) == {"name": "org/model-1b", "license": "other", "license_name": "custom"}


def test_card_with_verify_figures_after_a_real_verify(dense_dir, tmp_path):
    from upcycle.verify import verify

    dense, out = dense_dir("llama"), tmp_path / "moe"
    convert(dense, out, UpcycleOptions(experts=4, top_k=2))
    files = sorted(p.name for p in out.iterdir())
    report = verify(dense, out).to_json()
    rewrite_conversion_card(out, report)
    assert sorted(p.name for p in out.iterdir()) == files  # replaced in place, no temporary file left
    text = (out / "README.md").read_text()
    assert report["equivalent"] is True and "Not verified" not in text
    assert f"- Verdict: passed: {report['verdict']}" in text
    assert f"{report['weights']['tensors_checked']} tensors re-made from the dense model, 0 differing" in text
    assert f"max logit relative difference {report['function']['logits_rel_diff']:.3g}" in text
    assert f"{len(report['config']['layers'])} layers compute the same in transformers: yes" in text
    assert front_matter(out)["tags"]  # the front matter survives the rewrite


def test_rewrite_refuses_a_folder_that_is_no_conversion(tmp_path):
    (tmp_path / "upcycle.json").write_text(json.dumps({"kind": "trained", "training": {}}))
    with pytest.raises(SourceError, match="not a conversion"):
        rewrite_conversion_card(tmp_path, None)
    assert not (tmp_path / "README.md").exists()


def test_export_card_has_the_training_summary_and_held_out_losses(tiny_pair, texts, tmp_path):
    dense = dense_with_readme(tiny_pair[0], tmp_path, SOURCE_README)
    moe = tmp_path / "moe"
    convert(dense, moe, UpcycleOptions(experts=4, top_k=2))
    run = tmp_path / "run"
    # the training files as `hf download --repo-type dataset` lays them out: the card names that dataset
    snapshot = tmp_path / "hf" / "hub" / "datasets--tiny-org--plays" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    train_files = [str(shutil.copy(file, snapshot)) for file in texts[0]]
    recipe = recipe_dict(
        moe, run, (train_files, texts[1]), batch={"steps": 4}, run={"eval_interval": 2, "checkpoint_interval": 2}
    )
    summary = train(recipe_from_dict(recipe, tmp_path))
    export = Path(summary.export_dir)
    evals = [(r["step"], r["eval_loss"]) for r in read_metrics(run) if "eval_loss" in r]
    # the folders travel: no file in them names a local path, while this machine still finds the dense source
    assert local_paths_in(moe) == {} and local_paths_in(export) == {}
    assert json.loads((moe / "upcycle.json").read_text())["source"]["path"] == "<local>/dense"
    assert next(r for r in read_metrics(run) if "eval_loss" in r)["step0_matches_dense"] is True
    assert [step for step, _ in evals] == [0, 2, 4]
    card = held_out_rows(export)
    assert [step for step, _ in card] == [0, 2, 4]
    assert [loss for _, loss in card] == pytest.approx([loss for _, loss in evals], abs=5e-5)
    record = json.loads((export / "upcycle.json").read_text())
    rows = table(export)
    assert rows["Steps"] == str(record["training"]["steps"]) == "4"
    assert rows["Training tokens"] == f"{record['training']['tokens']:,}"
    assert rows["Target class"] == f"`{record['conversion']['architecture']}`"
    assert rows["Class"] == "`MixtralForCausalLM`"
    matter = front_matter(export)
    assert matter["base_model"] == "tiny-org/tiny-llama" and matter["license"] == "apache-2.0"
    assert matter["datasets"] == record["training"]["datasets"] == ["tiny-org/plays"]
    assert rows["Training data"].startswith(f"2 files: `{Path(train_files[0]).name}`")
    assert rows["Training data"].endswith("(from tiny-org/plays on the Hub)")
    assert "upcycled" in matter["tags"]
    text = (export / "README.md").read_text()
    assert "no longer equals the dense model" in text and "AutoTokenizer" in text

    early = export_checkpoint(run / "checkpoints" / "step-00000002", tmp_path / "early")
    assert held_out_rows(early) == [(step, round(loss, 4)) for step, loss in evals[:2]]
    assert table(early)["Steps"] == "2"


def test_the_shipped_smollm2_names_the_hub_model_it_stands_for() -> None:
    """Its card says what it is (a de-quantised Q4_1 GGUF) and names the Hub id, so every card made from it links
    its base_model; the GGUF's own display name is no repo id."""
    from upcycle import assets

    folder = assets.smollm2_folder()
    assert source_identity(folder) == {"name": assets.SMOLLM2_HUB_ID, "license": "apache-2.0"}
    assert "de-quantised" in (folder / "README.md").read_text()


def test_a_cache_key_is_no_title_nor_repo_id(dense_dir, tmp_path) -> None:
    from upcycle.model_card import conversion_card

    out = tmp_path / "moe"
    convert(dense_with_readme(dense_dir("llama"), tmp_path, SOURCE_README), out, UpcycleOptions(experts=4, top_k=2))
    record = json.loads((out / "upcycle.json").read_text())
    card = conversion_card(record, model_id="0123456789abcdef" * 2)
    assert "# tiny-llama, upcycled to 4 experts (top-2)\n" in card and '"path/to/this/folder"' in card
    assert "0123456789abcdef" not in card
    assert "# my-moe\n" in conversion_card(record, model_id="my-moe")  # a name the user chose stays the title


def test_base_model_is_written_only_as_a_hub_repo_id() -> None:
    """A GGUF's display name ("Smollm2 135M 8k ...") is no repo id: the Hub could not link it, so it is left out."""
    from upcycle.model_card import front_matter

    def matter(name: str) -> dict:
        return yaml.safe_load(front_matter({"name": name}, moe=True).strip("-\n"))

    assert matter("HuggingFaceTB/SmolLM2-135M-Instruct")["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for name in ("Smollm2 135M 8k Lc100K Mix1 Ep2", "/abs/path/model", "a/b/c", ""):
        assert "base_model" not in matter(name), name
