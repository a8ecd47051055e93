"""The `llm` reporter against a local OpenAI-compatible server (real socket, real `openai` client, full command)."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import preprocess
from ldm.data.lists import read_list
from preprocessing.report_llm import normalise_base_url


class ChatServer:
    """Serves /v1/chat/completions from a queue of scripted reply texts and records every request body."""

    def __init__(self):
        self.replies: list[str] = []
        self.requests: list[dict] = []
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.paths.append(self.path)
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                content = server.replies.pop(0) if server.replies else "out of replies"
                self._send(200, {
                    "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                })

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _reply(density="low density lesion,", size=(6, 7, 5)):
    attributes = {
        "enhancement status": "enhanced ct,", "lesion location": "5", "shape": "round-like,",
        "size": f"[[{size[0]} {size[1]} {size[2]}]] pixel,", "density": density,
        "density variations": "homogeneous,", "CT value": "Mean density of the lesion region is approximately 9 HU,",
        "surface characteristics": "well-defined margin,",
        "relationship with adjacent organs": "no close relationship with surrounding organs,",
        "specific features": "", "cavity": "within the parenchymal organ,",
    }
    return json.dumps({"5": ["round-like,", "", attributes, [[[65, 62, 30]], [list(size)]]]})


@pytest.fixture
def case(totalseg_example, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    (tmp_path / "imgs.txt").write_text(f"{totalseg_example / 'example_ct_sm.nii.gz'}\n")
    (tmp_path / "segs.txt").write_text(f"{totalseg_example / 'example_seg.nii.gz'}\n")
    (tmp_path / "attrs.txt").write_text('{"organ type": "liver", "lesion type": "cyst", "shape": "cystic"}\n')
    return tmp_path


def _run(folder, url, *extra):
    return preprocess.main([str(folder / "imgs.txt"), str(folder / "exp"), str(folder / "attrs.txt"),
                            "--seg-list", str(folder / "segs.txt"), "--seg-version", "v2", "--spacing", "3",
                            "--llm-base-url", url, "--llm-model", "local-model", "--no-progress", *extra])


def _report(folder):
    return json.loads(open(read_list(folder / "exp" / "type_list.txt")[0]).read())


def test_valid_reply_is_used_and_user_values_win(case):
    with ChatServer() as server:
        server.replies = [_reply()]
        assert _run(case, server.url) == 0
    assert len(server.requests) == 1 and server.paths == ["/v1/chat/completions"]
    request = server.requests[0]
    assert request["model"] == "local-model" and request["max_tokens"] >= 1024
    prompt = request["messages"][-1]["content"]
    assert "cyst in the liver" in prompt and "[[65, 62, 30]]" in prompt and '{"shape": "cystic,"}' in prompt
    assert '"cavity": [["within the parenchymal organ"], ["protruding from the parenchymal organ"]]' in prompt
    skeleton = json.loads(prompt.split("no other text:\n", 1)[1])
    assert list(skeleton) == ["5"] and skeleton["5"][3][0] == [[65, 62, 30]]
    attributes = _report(case)["5"][2]
    assert attributes["shape"] == "cystic," and attributes["density"] == "low density lesion,"
    assert attributes["size"] == "[[6 7 5]] pixel," and attributes["lesion location"] == "5"


def test_invalid_then_valid_reply_feeds_the_error_back(case, capsys):
    with ChatServer() as server:
        server.replies = [_reply(density="purple lesion,", size=(90, 7, 5)), _reply()]
        assert _run(case, server.url + "/chat/completions") == 0
    assert "warning: --llm-base-url" in capsys.readouterr().err
    assert len(server.requests) == 2 and server.paths == ["/v1/chat/completions"] * 2
    retry = server.requests[1]["messages"]
    assert retry[:2] == server.requests[0]["messages"]
    assert retry[-2]["role"] == "assistant" and "purple lesion" in retry[-2]["content"]
    feedback = retry[-1]["content"]
    assert "density: 'purple lesion' is not in the vocabulary" in feedback
    assert "size [90, 7, 5] voxels does not fit in the liver" in feedback
    assert _report(case)["5"][2]["density"] == "low density lesion,"


def test_garbage_replies_fail_the_case_with_the_reason(case, capsys):
    with ChatServer() as server:
        server.replies = ["I am sorry, I cannot help with that."] * 3
        assert _run(case, server.url, "--llm-retries", "2") == 1
    assert len(server.requests) == 3
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1
    assert "the LLM gave no valid report in 3 attempts; last problem: the reply is not valid JSON" in failed[0]
    assert read_list(case / "exp" / "img_list.txt") == []


def test_wrong_endpoint_gives_a_hint(case, capsys):
    with ChatServer() as server:
        assert _run(case, server.url.removesuffix("/v1") + "/api", "--llm-retries", "0") == 1
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("FAILED")]
    assert "404" in failed[0] and "check --llm-base-url" in failed[0]


def test_base_url_with_the_completions_path_is_stripped_with_a_warning():
    with pytest.warns(UserWarning, match="ends in /chat/completions"):
        assert normalise_base_url("http://h:8000/v1/chat/completions/") == "http://h:8000/v1"
    assert normalise_base_url("http://h:8000/v1/") == "http://h:8000/v1"
    assert normalise_base_url(None) is None


def test_llm_reporter_without_key_or_url_is_a_clear_error(case, capsys):
    code = preprocess.main([str(case / "imgs.txt"), str(case / "exp"), str(case / "attrs.txt"),
                            "--seg-list", str(case / "segs.txt"), "--reporter", "llm"])
    assert code == 1
    assert capsys.readouterr().err.strip() == ("error: --reporter llm needs an API key in $OPENAI_API_KEY or the "
                                               "--llm-base-url of a local server; or use --reporter offline")
