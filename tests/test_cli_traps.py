"""The command line keeps its promises: one meaning per flag, choices and exit codes in --help, names that say
what they do, and fixes that can be followed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

COMMANDS = ("convert", "verify", "eval", "train", "export", "compare", "sweep", "plot", "demo", "recipes", "cache")


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps help text to the terminal: one line per option here


def help_of(cli, command: str | None = None) -> str:
    result = cli(*((command,) if command else ()), "--help")
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_force_means_replace_wherever_it_appears(cli, wide):
    offered = [c for c in COMMANDS if "--force" in help_of(cli, c)]
    assert {"convert", "export", "plot", "train"} <= set(offered)
    for command in offered:
        text = help_of(cli, command)
        rows = [text[i : i + 120] for i in range(len(text)) if text.startswith("--force ", i)]
        assert any("Replace" in row for row in rows), (command, rows)
    for command in ("compare", "sweep"):  # writing beside a user's files is another thing, named for what it does
        text = help_of(cli, command)
        assert "--force" not in text and "--beside-others" in text, command


def test_help_lists_the_choices_and_the_exit_codes(cli, wide):
    convert = help_of(cli, "convert")
    choices_of = ("[renorm|softmax-topk]", "[random|zero|tied|cluster|hidden]", "[contiguous|activation]")
    for choices in (*choices_of, "[auto|float32|bfloat16|float16]"):
        assert choices in convert, choices
    assert "Hub id" in convert and "--revision" in convert
    top = help_of(cli)
    for code in ("0 done", "1 verify", "2 bad input", "3 a checkpoint", "4 training diverged", "130: Ctrl-C"):
        assert code in top, code
    refused = cli("convert", "a", "b", "--router", "softmax")  # still the library's one line, with the fix
    assert refused.exit_code == 2 and refused.stderr.startswith("error:") and "softmax-topk" in refused.stderr


def test_verify_says_its_token_count_is_a_minimum(cli, wide):
    text = help_of(cli, "verify")
    assert "--min-tokens" in text and "--max-tokens" not in text and "at least" in text


def test_compare_takes_a_shipped_recipe_by_name_and_claims_no_unmeasured_time(cli, wide):
    both = cli("compare", "dense-control", "--variant", "dense", "--out", os.devnull)
    assert both.exit_code == 2 and "give recipes or variants, not both" in " ".join(both.output.split())
    text = help_of(cli, "compare")
    assert "not timed yet" in text and "10 min" not in text


def test_a_sweep_without_a_grid_trains_nothing(cli, wide, tmp_path):
    refused = cli("sweep", "cpu-quickstart", "--out", tmp_path / "out")
    assert refused.exit_code == 2 and "would train one run" in " ".join(refused.output.split())
    assert not (tmp_path / "out").exists()


def exit_code_and_heavy_imports(args: list[str]) -> tuple[str, str]:
    """Run the CLI in a fresh interpreter: its exit code, whether torch/transformers got imported, its output."""
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom upcycle.cli import app\n"
        f"result = CliRunner().invoke(app, {args!r})\n"
        "print(result.exit_code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
        "print(result.output)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    first, *rest = run.stdout.splitlines()
    return first, " ".join(" ".join(rest).split()) + run.stderr


def test_a_recipe_typo_is_reported_before_torch_is_imported(tmp_path):
    """The error comes from the recipe alone: nothing heavy is imported first (3 s of start-up before)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: asset:smollm2\ndata:\n  train: asset:shakespeare/train\nbatch:\n  stepz: 3\n")
    first, output = exit_code_and_heavy_imports(["train", str(bad)])
    assert first == "2 False False", output
    assert "did you mean batch.steps?" in output


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (["convert", "{missing}", "{out}"], "does not exist"),
        (["convert", "{no_config}", "{out}"], "has no config.json"),
        (["verify", "{missing}", "{no_config}"], "was not written by upcycle convert"),
        (["verify", "{missing}", "{converted}"], "does not exist"),
        (["eval", "{missing}"], "is not a Hugging Face model folder"),
        (["eval", "{no_config}", "--tasks", "arc_easy", "--shots", "1"], "has prompts for 0, 5 shots"),
        (["eval", "{no_config}", "--tasks", "arc_easy"], "is not a Hugging Face model folder"),
    ],
)
def test_a_wrong_path_is_reported_before_torch_is_imported(tmp_path, command, said):
    """convert, verify and eval check what the file system alone can say before loading torch (2-3 s before)."""
    no_config, converted = tmp_path / "empty", tmp_path / "converted"
    no_config.mkdir()
    converted.mkdir()
    for name in ("config.json", "upcycle.json"):
        (converted / name).write_text("{}")
    paths = {"missing": tmp_path / "missing", "no_config": no_config, "converted": converted, "out": tmp_path / "o"}
    first, output = exit_code_and_heavy_imports([part.format(**paths) for part in command])
    assert first == "2 False False", output
    assert said in output
    assert not (tmp_path / "o").exists()


def test_scripts_get_json_from_convert_families_recipes_train_and_eval(cli, dense_dir, tmp_path):
    from upcycle.convert.families import FAMILIES

    dense = dense_dir("llama")
    planned = cli("convert", dense, tmp_path / "moe", "--dry-run", "--json", "-e", "4")
    report = json.loads(planned.stdout)
    assert planned.exit_code == 0 and report["dry_run"] is True and report["written"] is None
    assert report["plan"]["options"]["experts"] == 4 and not (tmp_path / "moe").exists()
    assert all(isinstance(count, int) for count in report["plan"]["shards"].values())
    written = json.loads(cli("convert", dense, tmp_path / "moe", "--json", "-e", "4").stdout)
    assert written["written"]["out"] == str(tmp_path / "moe") and written["written"]["bytes"] > 0
    families = json.loads(cli("families", "--json").stdout)
    assert sum(bool(row["targets"]) for row in families) == len(FAMILIES)
    recipes = json.loads(cli("recipes", "--json").stdout)
    assert "cpu-quickstart" in {r["name"] for r in recipes} and all(r["summary"] for r in recipes)
    plan = json.loads(cli("train", "cpu-quickstart", "--dry-run", "--json", "--world-size", "8").stdout)
    assert plan["layout"]["world_size"] == 8 and plan["model"]["experts_per_layer"] == 8
    memory = plan["memory_per_rank"]
    assert memory["total_bytes"] == sum(row["bytes"] for row in memory["rows"]) > 0
    refused = cli("train", "cpu-quickstart", "--json")
    assert refused.exit_code == 2 and "add --dry-run" in " ".join(refused.output.split())


def test_training_says_what_it_waits_for_before_the_first_step(tiny_pair, texts, tmp_path):
    """Tokenising (with its file count) and loading are announced before `start`, so a bar can show them."""
    from train_helpers import recipe_dict

    from upcycle.train.loop import train
    from upcycle.train.recipe import recipe_from_dict
    from upcycle.train.reporting import SilentReporter

    class Waits(SilentReporter):
        def __init__(self) -> None:
            self.heard: list[tuple] = []

        def start(self, info) -> None:
            self.heard.append(("start",))

        def working(self, what, done=None, total=None) -> None:
            self.heard.append((what, done, total))

    data = recipe_dict(
        tiny_pair[1], tmp_path / "run", texts, batch={"micro_batch_size": 2, "grad_accum": 1, "steps": 1}
    )
    data["data"]["cache_dir"] = str(tmp_path / "tokens")  # a cache of its own: the stream is really built
    reporter = Waits()
    train(recipe_from_dict(data, tmp_path), reporter=reporter)
    heard = reporter.heard
    first_start = heard.index(("start",))
    tokenising = [h for h in heard[:first_start] if h[0].startswith("tokenising")]
    counts = {h[1:] for h in tokenising}
    assert (len(texts[0]), len(texts[0])) in counts and (len(texts[1]), len(texts[1])) in counts  # train, eval
    assert ("loading the model", None, None) in heard[:first_start]


def test_verify_names_each_step_as_it_starts(tiny_pair):
    from upcycle.verify import verify

    dense, moe = tiny_pair
    stages: list[str] = []
    report = verify(dense, moe, stage=stages.append)
    assert report.equivalent
    assert stages[0] == "opening the dense model" and stages[1].startswith("config check")
    assert any(stage.startswith("function check") for stage in stages) and stages[-1].startswith("weight check")
