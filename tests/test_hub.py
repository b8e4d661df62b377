"""Models named by Hub id: a cache that huggingface_hub itself fills (from a local server that answers as the Hub
does), then convert, verify, eval and train resolve the id from it with HF_HUB_OFFLINE=1, recording the repository
and commit; an id that is neither a path nor cached is refused in one line."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml
from train_helpers import isolated_cache, make_tiny_pair, recipe_dict, run_cli, shakespeare_texts, write_recipe

from upcycle.errors import OptionError
from upcycle.hub import is_hub_id, resolve_model

REPO = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def git_blob_id(body: bytes) -> str:
    """The id git (and so the Hub, for a file not kept in LFS) gives a file's content."""
    return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()


class HubHandler(BaseHTTPRequestHandler):
    """The endpoints a snapshot download uses: a revision's information and file tree, and each file at it."""

    files: dict[str, bytes] = {}

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        path = unquote(self.path.split("?")[0])
        if path.startswith(f"/api/models/{REPO}/revision/"):
            info = {"id": REPO, "modelId": REPO, "sha": COMMIT, "private": False, "siblings": []}
            info["siblings"] = [{"rfilename": name} for name in sorted(self.files)]
            self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
            return
        if path.startswith(f"/api/models/{REPO}/tree/"):
            tree = [
                {"type": "file", "path": name, "size": len(body), "oid": git_blob_id(body)}
                for name, body in sorted(self.files.items())
            ]
            self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
            return
        prefix = f"/{REPO}/resolve/"
        if path.startswith(prefix):
            name = path[len(prefix) :].split("/", 1)[1]
            if name in self.files:
                body = self.files[name]
                etag = f'"{git_blob_id(body)}"'
                self._send(
                    200, body, {"X-Repo-Commit": COMMIT, "ETag": etag, "Content-Type": "application/octet-stream"}
                )
                return
        self._send(404, b"{}", {"X-Error-Code": "EntryNotFound" if path.startswith(prefix) else "RepoNotFound"})

    do_HEAD = do_GET  # noqa: N815


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the tiny dense folder, its exact upcycle made from the folder, a Hub cache holding the folder as REPO)."""
    dense, moe = make_tiny_pair(tmp_path_factory.mktemp("tiny"))
    HubHandler.files = {p.name: p.read_bytes() for p in dense.iterdir() if p.is_file()}
    cache = tmp_path_factory.mktemp("hf") / "hub"
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        from huggingface_hub import snapshot_download

        endpoint = f"http://127.0.0.1:{server.server_port}"
        snapshot_download(REPO, cache_dir=cache, endpoint=endpoint, token=False)
    finally:
        server.shutdown()
    return dense, moe, cache


def offline(cache: Path) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_a_hub_id_resolves_from_the_cache_through_convert_verify_and_eval(hub, tmp_path: Path) -> None:
    dense, moe_from_folder, cache = hub
    out = tmp_path / "moe"
    converted = run_cli("convert", REPO, str(out), "--experts", "4", env=offline(cache))
    assert converted.returncode == 0, converted.stderr
    assert f"{REPO}: from the Hugging Face cache" in converted.stderr  # said, with the file count's bar
    record = json.loads((out / "upcycle.json").read_text())["source"]
    assert (record["repo_id"], record["revision"], record["path"], record["name"]) == (REPO, COMMIT, REPO, REPO)
    assert record["sha256"] == json.loads((moe_from_folder / "upcycle.json").read_text())["source"]["sha256"]
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["base_model"] == REPO and str(cache) not in card
    for name in ("model-00001-of-00001.safetensors", "config.json"):  # the same checkpoint as from the folder
        assert (out / name).read_bytes() == (moe_from_folder / name).read_bytes(), name
    verified = run_cli("verify", REPO, str(out), "--json", env=offline(cache))
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["equivalent"] is True
    scored = run_cli("eval", REPO, "--tasks", "piqa", "--limit", "2", "--json", env=offline(cache))
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["model"] == REPO


def test_a_recipe_trains_a_hub_id_and_records_it(hub, tmp_path: Path) -> None:
    dense, _, cache = hub
    data = recipe_dict(dense, tmp_path / "run", shakespeare_texts())
    data["model"] = {"source": REPO, "upcycle": {"experts": 4, "top_k": 2}, "experts_implementation": "grouped_mm"}
    data["batch"]["steps"] = 2
    data["run"].update(eval_interval=0, checkpoint_interval=0, export=False)
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    env = {**offline(cache), "UPCYCLE_CACHE": str(isolated_cache(tmp_path / "cache"))}
    trained = run_cli("train", str(recipe), env=env)
    assert trained.returncode == 0, trained.stderr
    records = list((tmp_path / "cache" / "conversions").glob("*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert (record["source"], record["repo_id"], record["revision"]) == (REPO, REPO, COMMIT)
    assert json.loads((Path(records[0].with_suffix("")) / "upcycle.json").read_text())["source"]["repo_id"] == REPO


def test_an_id_neither_local_nor_cached_is_refused_offline_in_one_line(hub, tmp_path: Path) -> None:
    _, _, cache = hub
    missing = run_cli("convert", "tiny-org/absent", str(tmp_path / "out"), env=offline(cache))
    assert missing.returncode == 2 and not (tmp_path / "out").exists()
    assert "tiny-org/absent is neither a local path nor in the Hugging Face cache" in missing.stderr
    assert "HF_HUB_OFFLINE is set" in missing.stderr and "Traceback" not in missing.stderr


def test_a_local_folder_of_the_same_shape_wins_and_revision_needs_an_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("owner/model") and not is_hub_id("./owner/model") and not is_hub_id("a/b/c")
    (tmp_path / "owner" / "model").mkdir(parents=True)
    assert not is_hub_id("owner/model") and resolve_model("owner/model").folder == Path("owner/model")
    with pytest.raises(OptionError, match="--revision applies to Hub ids"):
        resolve_model("owner/model", revision="main")
