"""LoRAs per request (PARTICALIZE_REQUEST_LORAS, off by default), through the API and one warm in-process worker:
refused at Run in Wiro's shape (code 0) when off, for a tool that does not take them, from a host not on the
allow-list, or malformed; on, a task runs with them (its video equal to a fresh `generate` with the LoRA as a file)
and the next task without them is as before; the files are downloaded once (a second task uses the cache), and a
file too large, not a LoRA or not for this base fails its task saying so while the worker serves the next one.
The LoRA files are written by the test in a published layout and served from 127.0.0.1."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from particalize.compose_server import build_app
from server.task_record import RequestLora, record_of
from tests.conftest import make_settings
from tests.images import png_bytes
from tests.loopback import LoopbackServer

MAX_BYTES = 64 * 1024
INPUTS = {"prompt": "a glass dog shatters", "numFrames": "5", "steps": "2", "seed": "11", "width": "32",
          "height": "32", "fps": "8"}
IMAGE = png_bytes(32, 32)


class LoraServer(LoopbackServer):
    """Serves named files on 127.0.0.1, counting the GETs of each; /moved/NAME redirects to NAME on `localhost`."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.gets = files, Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                name = self.path.lstrip("/")
                server.gets[name] += 1
                if name.startswith("moved/"):
                    self.send_response(302)
                    self.send_header("location", f"http://localhost:{server.port}/{name.removeprefix('moved/')}")
                    self.end_headers()
                    return
                data = server.files.get(name)
                self.send_response(200 if data is not None else 404)
                self.send_header("content-length", str(len(data or b"")))
                self.end_headers()
                self.wfile.write(data or b"")

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(Handler)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from pipeline.generator import GeneratorOptions, VideoGenerator
    from pipeline.presets import get_preset
    from tests.lora_files import make_weights, write_lora

    tmp = tmp_path_factory.mktemp("served-loras")
    transformer = VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp)).pipe.transformer
    effect = write_lora(tmp / "effect.safetensors", make_weights(transformer, seed=31, magnitude=0.25), "kohya")
    block = transformer.blocks[0].attn1.to_q
    wrong = tmp / "wrong.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, block.in_features * 2),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(block.out_features, 4)}, str(wrong))
    assert effect.stat().st_size < MAX_BYTES
    return {"effect": effect, "wrong": wrong}


@pytest.fixture
def served(lora_files: dict[str, Path]) -> Iterator[LoraServer]:
    server = LoraServer({"effect.safetensors": lora_files["effect"].read_bytes(),
                         "wrong-shapes.safetensors": lora_files["wrong"].read_bytes(),
                         "page.safetensors": b"<html><body>Sign in to download</body></html>",
                         "huge.safetensors": b"\0" * (MAX_BYTES + 1)})
    yield server
    server.close()


def settings_for(tmp_path: Path, **overrides: Any):
    values: dict[str, Any] = dict(allow_private_urls=True, request_loras=True, request_lora_hosts="127.0.0.1",
                                  request_lora_max_bytes=MAX_BYTES, request_lora_cache_bytes=4 * MAX_BYTES)
    return make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", **{**values, **overrides})


def run(client: TestClient, loras: Any = None, slug: str = "codexq/Particalize", **send: Any) -> dict[str, Any]:
    fields = {**INPUTS, **({"loras": loras} if loras is not None else {})}
    if send.get("json"):
        return client.post(f"/v1/Run/{slug}", json={**fields, "inputImageUrl": send["json"]}).json()
    return client.post(f"/v1/Run/{slug}", data=fields, files={"inputImage": ("start.png", IMAGE)}).json()


def refusal(answer: dict[str, Any]) -> str:
    assert answer["result"] is False and len(answer["errors"]) == 1, answer
    assert answer["errors"][0]["code"] == 0, answer
    return answer["errors"][0]["message"]


# --- at Run ----------------------------------------------------------------------------------------------------------

def test_off_by_default_a_run_sending_loras_is_refused_with_code_0(tmp_path: Path, served: LoraServer):
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", allow_private_urls=True)
    assert settings.request_loras is False
    with TestClient(build_app(settings)) as client:
        for loras in (served.url("effect.safetensors"), json.dumps([{"url": served.url("effect.safetensors")}])):
            message = refusal(run(client, loras))
            assert message == ("Request parameter [loras] is not accepted: request LoRAs are disabled on this server "
                               "(an operator turns them on with PARTICALIZE_REQUEST_LORAS=1 and "
                               "PARTICALIZE_REQUEST_LORA_HOSTS).")
        as_json = client.post("/v1/Run/codexq/Particalize",
                              json={**INPUTS, "inputImageUrl": "http://127.0.0.1:9/a.png",
                                    "loras": [{"url": served.url("effect.safetensors")}]}).json()
        assert "disabled on this server" in refusal(as_json)
        for empty in ("", "[]"):  # what a form sends for a field left empty: as if not sent
            assert run(client, empty)["result"] is True
        assert client.app.state.services.store.reads.get(1) is not None


def test_every_form_a_client_sends_is_read_into_the_tasks_record(tmp_path: Path, served: LoraServer):
    effect, other = served.url("effect.safetensors"), f"http://127.0.0.1:{served.port}/b.safetensors"
    sha = "ab" * 32
    expected = (RequestLora(url=effect, strength=0.8), RequestLora(url=other, strength=1.0))
    with TestClient(build_app(settings_for(tmp_path))) as client:
        store = client.app.state.services.store
        for loras in (f"{effect}:0.8,{other}",
                      json.dumps([{"url": effect, "strength": "0.8"}, other]),
                      json.dumps([f"{effect}:0.8", {"url": other}])):
            answer = run(client, loras)
            assert answer["result"] is True, answer
            assert record_of(store.reads.get(int(answer["taskid"]))).loras == expected
        answer = client.post("/v1/Run/codexq/Particalize", json={
            **INPUTS, "inputImageUrl": "http://127.0.0.1:9/a.png",
            "loras": [{"url": effect, "strength": 0.5, "sha256": sha.upper()}]}).json()
        record = record_of(store.reads.get(int(answer["taskid"])))
        assert record.loras == (RequestLora(url=effect, strength=0.5, sha256=sha),)
        (task,) = client.post("/v1/Task/Detail", json={"taskid": answer["taskid"]}).json()["tasklist"]
        assert json.loads(task["parameters"]["loras"]) == [{"url": effect, "strength": 0.5, "sha256": sha}]


@pytest.mark.parametrize(("loras", "expected"), [
    ("http://localhost:{port}/effect.safetensors", "item 1 is on host 'localhost', which is not on this server's "
                                                   "list of hosts request LoRAs may come from (127.0.0.1;"),
    ("ftp://127.0.0.1/effect.safetensors", "item 1 must be an http(s) URL"),
    ("{url}:5", "item 1 strength must be between 0 and 4, got 5"),
    ("{url},{url},{url}", "lists 3 LoRAs; this server takes at most 2 per request"),
    ('[{{"url": "{url}", "weight": 1}}]', "item 1 has unknown keys ['weight']"),
    ('[{{"url": "{url}", "sha256": "abc"}}]', "item 1 \"sha256\" must be the file's SHA-256"),
    ('[{{"url": "{url}"', "is not a valid JSON list"),
    ("[3]", "item 1 must be a URL text or an object with a url, not a JSON int"),
])
def test_a_bad_loras_value_is_refused_at_run_with_code_0(tmp_path: Path, served: LoraServer, loras: str,
                                                         expected: str):
    with TestClient(build_app(settings_for(tmp_path))) as client:
        text = loras.format(port=served.port, url=served.url("effect.safetensors"))
        message = refusal(run(client, text))
        assert message.startswith("Request parameter [loras] ") and expected in message, message
    assert served.gets == Counter()  # nothing is fetched at Run


def test_a_catalogue_tool_takes_request_loras_only_when_its_entry_says_so(tmp_path: Path, served: LoraServer,
                                                                          lora_files: dict[str, Path]):
    catalogue = tmp_path / "tools.toml"
    effect = lora_files["effect"]
    catalogue.write_text(f'[[tools]]\nslug = "remade/Squish"\nloras = ["{effect}"]\n'
                         f'[[tools]]\nslug = "remade/Inflate"\nloras = ["{effect}"]\nrequest_loras = true\n')
    with TestClient(build_app(settings_for(tmp_path, tools_file=catalogue))) as client:
        url = served.url("effect.safetensors")
        assert refusal(run(client, url, slug="remade/Squish")) == (
            "Request parameter [loras] is not accepted: tool remade/Squish does not take request LoRAs (its catalogue "
            "entry would need request_loras = true).")
        assert run(client, url, slug="remade/Inflate")["result"] is True
        assert run(client, url)["result"] is True  # the default tool, not described by the file, takes them


def test_tool_detail_describes_the_loras_input_only_where_a_run_may_send_it(tmp_path: Path,
                                                                            lora_files: dict[str, Path]):
    catalogue = tmp_path / "tools.toml"
    effect = lora_files["effect"]
    catalogue.write_text(f'[[tools]]\nslug = "remade/Squish"\nloras = ["{effect}"]\n'
                         f'[[tools]]\nslug = "remade/Inflate"\nloras = ["{effect}"]\nrequest_loras = true\n')

    def advanced_ids(client: TestClient, owner: str, project: str) -> list[str]:
        tool = client.post("/v1/Tool/Detail", json={"slugowner": owner, "slugproject": project}).json()["tool"][0]
        return [item["id"] for group in tool["parameters"][1:] for item in group["items"]]

    with TestClient(build_app(settings_for(tmp_path, tools_file=catalogue))) as client:
        assert "loras" in advanced_ids(client, "remade", "Inflate")
        assert "loras" not in advanced_ids(client, "remade", "Squish")
        tool = client.post("/v1/Tool/Detail", json={"slugowner": "remade", "slugproject": "Inflate"}).json()
        item = next(i for g in tool["tool"][0]["parameters"] for i in g["items"] if i["id"] == "loras")
        assert item["note"] == f"at most 2, each at most {MAX_BYTES} bytes, from 127.0.0.1; strength 0-4 (default 1)"
    off = make_settings(tmp_path / "off", f"sqlite:///{tmp_path / 'off.db'}", tools_file=catalogue)
    with TestClient(build_app(off)) as client:
        assert "loras" not in advanced_ids(client, "remade", "Inflate")


def test_turning_them_on_needs_a_host_list(tmp_path: Path):
    with pytest.raises(ValueError, match="PARTICALIZE_REQUEST_LORAS=1 needs the hosts"):
        make_settings(tmp_path, request_loras=True)


# --- on one warm worker ---------------------------------------------------------------------------------------------

def test_a_worker_runs_request_loras_caches_them_and_fails_bad_ones_clearly(tmp_path: Path, served: LoraServer,
                                                                           lora_files: dict[str, Path]):
    from particalize.cli import main
    from particalize.compose import make_generator
    from particalize.core_options import worker_options
    from server.worker import Worker

    settings = settings_for(tmp_path)
    generator = make_generator(settings)
    with TestClient(build_app(settings)) as client:
        services = client.app.state.services
        worker = Worker(services.store, services.storage, generator, worker_options(settings),
                        worker_id="testnode/gpu0")

        def task(loras: Any = None) -> dict[str, Any]:
            answer = run(client, loras)
            assert answer["result"] is True, answer
            assert worker.run_once()
            (detail,) = client.post("/v1/Task/Detail", json={"taskid": answer["taskid"]}).json()["tasklist"]
            return detail

        def video(detail: dict[str, Any]) -> bytes:
            assert detail["pexit"] == "0", detail["debugerror"]
            uuid = services.store.reads.get(int(detail["id"])).uuid
            return (settings.outputs_dir / services.storage.output_relpath(uuid, detail["outputs"][0]["name"])
                    ).read_bytes()

        effect = served.url("effect.safetensors")
        plain = video(task())
        with_lora = task(f"{effect}:0.8")
        assert "1 request LoRA (1 downloaded, 0 from the cache)" in with_lora["debugoutput"]
        made = video(with_lora)
        assert made != plain
        assert video(task()) == plain  # the next task without them: as before
        again = task(json.dumps([{"url": effect, "strength": 0.8}]))
        assert "(0 downloaded, 1 from the cache)" in again["debugoutput"] and video(again) == made
        assert served.gets["effect.safetensors"] == 1

        failures = {
            "huge.safetensors": f"is too large: this server takes request LoRAs of at most {MAX_BYTES} bytes",
            "page.safetensors": "cannot be used: cannot read",
            "wrong-shapes.safetensors": "cannot be used: it is not a LoRA for this model",
            "missing.safetensors": "could not be downloaded",
            "moved/effect.safetensors": "is refused: http://localhost:",
        }
        for name, expected in failures.items():
            failed = task(served.url(name))
            assert failed["status"] == "task_postprocess_end" and failed["pexit"] == "1", failed
            assert failed["debugerror"].startswith(f"Request parameter [loras] item 1 ({served.url(name)}) ")
            assert expected in failed["debugerror"], failed["debugerror"]
            assert video(task()) == plain  # the worker serves the next task, its model unchanged
        cache = settings.data_dir / "request-loras"
        assert sorted(path.name for path in (cache / "partial").iterdir()) == []
        assert len(list((cache / "blobs").iterdir())) == 3  # the LoRA, and the two files that are not one

    fresh = tmp_path / "fresh.mp4"
    (tmp_path / "start.png").write_bytes(IMAGE)
    assert main(["generate", "--model", "tiny", "--image", str(tmp_path / "start.png"), "--out", str(fresh),
                 "--lora", f"{lora_files['effect']}:0.8", "--prompt", INPUTS["prompt"], "--num-frames", "5",
                 "--steps", "2", "--seed", "11", "--width", "32", "--height", "32", "--fps", "8"]) == 0
    assert made == fresh.read_bytes()
