"""Test helpers for the server tests: create_app(...) under a real uvicorn on a free 127.0.0.1 port, in a thread,
and an untrained tiny model folder to serve. (Their shared fixtures, `http` and the idle check, are in conftest.py.)"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

import nanoseek
from nanoseek.data import default_corpus, train_tokenizer
from nanoseek.infer import LLM
from nanoseek.serve import create_app


def save_tiny_model(folder) -> str:
    """An untrained `tiny` model with a tokenizer trained on 200 documents of the embedded corpus."""
    tok = train_tokenizer(default_corpus(200), vocab_size=512)
    nanoseek.save_pretrained(nanoseek.build_model(nanoseek.ModelConfig.preset("tiny", vocab_size=tok.vocab_size),
                                                  seed=0), folder)
    tok.save(folder)
    return str(folder)




class LiveServer:
    def __init__(self, model_dir, api_key: str | None, max_num_seqs: int = 4, **app_kwargs):
        self.llm = LLM(model_dir, max_num_seqs=max_num_seqs)
        self.engine = self.llm.llm_engine
        self.app = create_app(self.llm, "tiny", api_key=api_key, **app_kwargs)
        self.runner = self.app.state.runner
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """True once no request holds a slot (polled: the engine thread frees them asynchronously)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if (self.runner.num_active == 0 and not self.engine.has_unfinished_requests()
                    and self.engine.scheduler.num_free_slots == self.engine.max_num_seqs):
                return True
            time.sleep(0.02)
        return False
