"""Shared helpers of the payload tests: paths, the service-account token and a fake ConfigMap API server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
OPERATOR_DIR = REPO / "operator"
PAYLOAD_DATA = REPO / "tests" / "payload_data"
TOKEN = "test-sa-token-0123456789abcdef"


class FakeConfigMapAPI:
    """Records PATCHes to one ConfigMap, checks the bearer token and applies JSON merge patches to `data`.

    `fail_with` holds HTTP status codes to answer (in order) before answering normally.
    """

    def __init__(self, namespace: str, name: str, token: str):
        self.path = f"/api/v1/namespaces/{namespace}/configmaps/{name}"
        self.token = token
        self.fail_with: List[int] = []
        self.requests: List[Dict[str, Any]] = []
        self.data: Dict[str, str] = {}
        self._server: Optional[ThreadingHTTPServer] = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def patches(self) -> List[Dict[str, Any]]:
        """The `data` of every accepted patch, in order."""
        return [r["body"]["data"] for r in self.requests if r["status"] == 200]

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        record = {
            "method": handler.command,
            "path": handler.path,
            "authorization": handler.headers.get("Authorization"),
            "content_type": handler.headers.get("Content-Type"),
            "raw": raw.decode("utf-8"),
        }
        if handler.command != "PATCH" or handler.path != self.path:
            status = 404
        elif record["authorization"] != f"Bearer {self.token}":
            status = 401
        elif record["content_type"] != "application/merge-patch+json":
            status = 415
        elif self.fail_with:
            status = self.fail_with.pop(0)
        else:
            status = 200
        if status == 200:
            record["body"] = json.loads(raw)
            for key, value in record["body"].get("data", {}).items():
                if value is None:
                    self.data.pop(key, None)
                else:
                    self.data[key] = value
        record["status"] = status
        self.requests.append(record)
        answer = json.dumps({"kind": "ConfigMap", "data": self.data} if status == 200 else {"code": status})
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(answer)))
        handler.end_headers()
        handler.wfile.write(answer.encode("utf-8"))

    def start(self, ssl_context=None) -> "FakeConfigMapAPI":
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self):  # noqa: N802 (http.server naming)
                api._handle(self)

            do_GET = do_PUT = do_POST = do_PATCH  # noqa: N815

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if ssl_context is not None:
            self._server.socket = ssl_context.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()


def make_tiny_qwen(folder: Path) -> None:
    """A random two-layer Qwen2 and a small BPE tokenizer with Qwen's chat tokens, saved like a hub snapshot."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    rows = [json.loads(line) for line in (PAYLOAD_DATA / "viggo_test.jsonl").read_text().splitlines()]
    texts = [row[k] for row in rows for k in ("instruction", "input", "output")] + ["system user assistant"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False)).save_pretrained(str(folder))
