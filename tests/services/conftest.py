"""Fixtures of the service-loop tests: a run in the in-memory store and bus, and the byte
tokenizer of the default task."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from dapo.data.task.tokenizer import save_byte_tokenizer
from dapo.runtime.runs import MemoryRunStore
from dapo.runtime.service import ServiceContext
from dapo.transport.memory_bus import MemoryBroker, MemoryBus
from proto.runspec import RunSpec


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    save_byte_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture
def memory_context():
    """``memory_context(spec, kind, worker_id)``: a running run over ``MemoryBus`` and
    ``MemoryRunStore``; contexts made by one test share the run, the store and the broker
    (a second context with the same worker id is that service restarted)."""
    store, broker = MemoryRunStore(), MemoryBroker()

    def make(spec: RunSpec, kind: str, worker_id: str | None = None) -> ServiceContext:
        run_id = "r1"
        if not store.states:
            store.create(spec, run_id)
            store.act(run_id, "start")
        bus = MemoryBus(run_id, broker=broker)
        return ServiceContext(kind, run_id, spec, worker_id or f"{kind}-0", bus, store)

    return make
