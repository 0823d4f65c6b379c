"""The host side of the slot engine: a small loop that only moves requests and slot indices.

::

    while requests are pending or slots are busy:
        fill every free slot: prefill the next request in its bucketed shape and insert it
        run one chunk (<= K decode steps on the device; it leaves once r slots are free)
        drain the slots that finished: their tokens become results, the slots are free

Requests are pulled from the caller's iterator as slots free up, at most ``prefetch`` ahead
of the slots (a background thread pulls them, so that the host work of taking a request in,
such as tokenising and compiling a JSON Schema, runs while the device decodes), so an endless
input costs constant memory; results are yielded as requests finish.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsample.automata import json_schema, stop
from jaxsample.decode import RUNNING
from jaxsample.engine import programs
from jaxsample.engine import slots as sl
from jaxsample.engine.slots import EMPTY
from jaxsample.model.config import INVARIANT_TILE
from jaxsample.params import check_engine_options, resolve_max_seq_len
from jaxsample.rows import TOP_LOGPROBS_MAX, RowParams

_AXIS = "slots"

# ------------------------------------------------------------------------------ compiles

_COMPILES = [0]


def _on_event(event: str, duration: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def token_bytes_list(tb: stop.TokenBytes) -> list[bytes]:
    """The vocabulary's bytes back from the device table (for building a schema pool)."""
    table, lengths = np.asarray(tb.table), np.asarray(tb.lengths)
    return [bytes(table[i, : lengths[i]]) for i in range(len(lengths))]


def compile_count() -> int:
    """How many XLA programs this process has compiled so far (every jit, not only ours)."""
    return _COMPILES[0]


# ------------------------------------------------------------------------------ requests


class SlotRequest(NamedTuple):
    """One request, ready for a slot (everything validated and packed on the host)."""

    key: Any  # the caller's handle, returned with the result
    prompt: list[int]  # token ids, 1 <= len
    rows: RowParams  # numpy, leading axis 1
    max_tokens: int  # budget; prompt + max_tokens <= the engine's max_seq_len
    stops: tuple[str, ...] = ()
    json_mode: bool = False
    schema: Any = None  # a json_schema.CompiledSchema, or None


class PassThrough(NamedTuple):
    """An item of :meth:`SlotEngine.run`'s input that is not decoded: ``run`` yields it back
    as soon as it pulls it, in input order with the results (how a refused request's answer
    comes back promptly, without buffering the refusals)."""

    value: Any


class SlotResult(NamedTuple):
    """One finished request (host numpy arrays; ``n`` tokens)."""

    key: Any
    tokens: np.ndarray  # [n] int32
    logprobs: np.ndarray  # [n] float32
    top_ids: np.ndarray  # [n, 20] int32
    top_logprobs: np.ndarray  # [n, 20] float32
    finish: int  # a finish code of jaxsample.decode
    error: Exception | None = None  # the request could not be placed (nothing was decoded)


@dataclasses.dataclass
class EngineStats:
    """Counters of a run (host side). Occupancy = tokens / slot_steps."""

    chunks: int = 0  # device round trips
    steps: int = 0  # decode steps
    slot_steps: int = 0  # steps x slots
    row_steps: int = 0  # steps x rows run (a narrow chunk runs fewer rows than slots)
    tokens: int = 0  # tokens produced
    requests: int = 0  # requests finished
    prefill_s: float = 0.0  # time in prefill + insert calls (host wall clock)
    chunk_s: float = 0.0  # time in chunk calls, until their outputs are on the host
    host_s: float = 0.0  # the rest of the loop: draining, bookkeeping, pulling requests
    wall_s: float = 0.0

    @property
    def occupancy(self) -> float:
        return self.tokens / self.slot_steps if self.slot_steps else 0.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["occupancy"] = self.occupancy
        d["steps_per_round_trip"] = self.steps / self.chunks if self.chunks else 0.0
        return d


@dataclasses.dataclass
class _Running:
    request: SlotRequest
    schema: Any = None  # the json_schema.Handle the slot holds in the pool
    n: int = 0  # tokens received so far (the sum of the lengths of the parts below)
    tokens: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    top_ids: list = dataclasses.field(default_factory=list)
    top_logprobs: list = dataclasses.field(default_factory=list)

    def result(self, finish: int) -> SlotResult:
        def cat(parts, shape, dtype):
            return np.concatenate(parts) if parts else np.zeros(shape, dtype)

        return SlotResult(
            key=self.request.key,
            tokens=cat(self.tokens, (0,), np.int32),
            logprobs=cat(self.logprobs, (0,), np.float32),
            top_ids=cat(self.top_ids, (0, TOP_LOGPROBS_MAX), np.int32),
            top_logprobs=cat(self.top_logprobs, (0, TOP_LOGPROBS_MAX), np.float32),
            finish=finish,
        )


#: How many distinct sets of stop strings :func:`_stop_tables` keeps (66 KiB each).
STOP_CACHE_SIZE = 256


@functools.lru_cache(maxsize=STOP_CACHE_SIZE)
def _stop_tables(stops: tuple[str, ...]) -> stop.StopTables:
    """One request's stop tables as host arrays, cached by content: a job's requests mostly
    share their stop strings (or have none), and the tables are read only."""
    return stop.compile_stops([stops], as_numpy=True)


@jax.tree_util.register_static
class _HashedGraphDef(nnx.GraphDef):
    """The model's graph definition with its hash computed once.

    It is a static argument of every compiled call of the host loop (one admission per
    request, one chunk per round trip), and jit hashes its static arguments at every call:
    flax's ``GraphDef.__hash__`` walks every node (45 µs for the 2-layer test model, 710 µs
    for SmolLM2's 246 nodes on this CPU), host time spent per request for nothing. Equal to,
    and printed as, the graph definition it wraps (a frozen value, so its hash never
    changes); ``nnx.merge`` takes it as any GraphDef."""

    __slots__ = ("_hash", "_source")

    def __init__(self, graphdef: nnx.GraphDef):
        super().__init__(graphdef.nodes, graphdef.attributes, graphdef.num_leaves)
        object.__setattr__(self, "_source", graphdef)
        object.__setattr__(self, "_hash", nnx.GraphDef.__hash__(graphdef))

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return repr(self._source)


#: Seconds :meth:`_Prefetch.close` waits for the thread to finish the item it is pulling.
CLOSE_WAIT = 10.0


class _Prefetch:
    """An iterator that a background thread pulls ``depth`` items ahead of its consumer.

    Pulling a request is host work (the API tokenises it, packs its parameters and compiles
    its JSON Schema: 1-100 ms) that would otherwise run between two device calls, with the
    device idle. The thread runs it while the main thread waits for a chunk (JAX releases the
    GIL there). The consumer still takes items exactly when it did without the thread, in the
    input's order, so the schedule (which request goes to which slot, when) is the same; an
    exception of the input comes out where the input raised it, after the items before it.
    """

    _ITEM, _END, _RAISE = range(3)

    def __init__(self, it: Iterator, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=self._fill, args=(it,), name="jaxsample-prefetch", daemon=True
        )
        self._thread.start()

    def _fill(self, it: Iterator) -> None:
        try:
            for item in it:
                if not self._put((self._ITEM, item)):
                    return  # closed: the input is left where it is
            self._put((self._END, None))
        except BaseException as err:  # handed to the consumer, raised there
            self._put((self._RAISE, err))

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == self._ITEM:
            return value
        self._done = True
        self._thread.join()
        if kind == self._RAISE:
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stops the thread: it ends after the item it is pulling, if any, and is waited for
        (up to :data:`CLOSE_WAIT` seconds, for an input that blocks). A thread left running
        when the interpreter exits (a run stopped by Ctrl-C, say) is killed wherever it is,
        and killed inside a C++ call (the tokenizer, JAX) it aborts the whole process."""
        self._done = True
        self._stop.set()
        self._thread.join(timeout=CLOSE_WAIT)


# ------------------------------------------------------------------------------ the engine


def prompt_bucket(n: int, max_len: int) -> int:
    """The static length a prompt of ``n`` tokens is padded to: the smallest
    ``(2**k - 1) * 16 >= n`` (16, 48, 112, 240, 496, ...), capped at ``max_len``
    (:meth:`SlotEngine.prompt_bucket`; the scoring program uses the same buckets).

    >>> [prompt_bucket(n, 2048) for n in (1, 16, 17, 49, 2000)], prompt_bucket(300, 256)
    ([16, 16, 48, 112, 2032], 256)
    """
    size = INVARIANT_TILE
    while size < n:
        size = 2 * size + INVARIANT_TILE
    return min(size, max_len)


class SlotEngine:
    """Continuous batching inside the compiled loop, over ``slots`` fixed slots.

    Args:
      model: a :class:`jaxsample.model.Llama`; build it with ``batch_invariant=True`` (the
        default of :meth:`jaxsample.Engine.load`) for tokens that do not depend on the other
        slots.
      grammar, token_bytes: the JSON-mode tables and the token-bytes table (shared).
      schema_pool: a :class:`jaxsample.automata.json_schema.SchemaPool` for requests with a
        JSON Schema (``SlotRequest.schema``); its device tables are shared by every slot and
        a new schema is written into them as data (no recompile).
      slots: S, the number of slots (static). A multiple of the number of devices.
      chunk_steps: K, the most decode steps per device round trip (static).
      refill_free: r, a chunk ends early once r slots are free and requests are waiting
        (a value: changing it never recompiles).
      max_seq_len: positions per slot (prompt + output), the KV cache's length per slot;
        default ``min(context_length, 2048)``.
      devices: the devices the slots are split over (data parallel; default: one device).
      transforms: a static user transform chain for the sampler (see docs/sampler.md).
      prefetch: how many requests a background thread pulls from the input ahead of the
        slots (default: ``slots``); 0 pulls each one on the main thread when a slot takes
        it. The host work of taking a request in then overlaps the device's decoding.
      widths: the row counts a chunk may run at, per device (static; each a compiled program,
        built when first used). A chunk runs the model and the sampler on the first W slots
        of each device only, W the smallest width that holds every running slot; a request
        takes the free slot of lowest index (spread over the devices), so a few requests
        run at a few rows' cost. Default: by platform (:func:`jaxsample.params.check_widths`:
        ``(1, 4, 16)`` for 16 slots on a CPU, the full width alone elsewhere).
    """

    def __init__(
        self,
        model,
        *,
        grammar,
        token_bytes: stop.TokenBytes,
        schema_pool=None,
        slots: int = 16,
        chunk_steps: int = 32,
        refill_free: int = 1,
        max_seq_len: int | None = None,
        devices=None,
        transforms=(),
        prefetch: int | None = None,
        widths=None,
    ):
        cfg = model.config
        programs.warn_if_maps_low()
        self.n_slots, self.chunk_steps, self.refill_free, devices, self.prefetch, self.widths = (
            check_engine_options(slots, chunk_steps, refill_free, devices, prefetch, widths)
        )
        devices = devices if devices is not None else jax.devices()[:1]
        self.max_seq_len = resolve_max_seq_len(max_seq_len, cfg.context_length)
        self.transforms = transforms
        self.model_config = cfg
        self._dtype = model.dtype
        self.mesh = Mesh(np.array(devices), (_AXIS,))
        self.n_devices = len(devices)
        self._local = self.n_slots // self.n_devices  # slots per device
        self._replicated = NamedSharding(self.mesh, P())
        self._split = NamedSharding(self.mesh, P(_AXIS))
        graphdef, state = nnx.split(model)
        self._graphdef = _HashedGraphDef(graphdef)  # hashed once, not at every compiled call
        self._model_state = jax.device_put(state, self._replicated)
        if schema_pool is None:
            schema_pool = json_schema.SchemaPool(
                token_bytes_list(token_bytes), eos_id=cfg.eos_id, size="small"
            )
        self.schema_pool = schema_pool
        self._grammar, self._token_bytes = grammar, token_bytes
        self._shared = None
        self._placed: dict = {}  # id(host leaf) -> (host leaf, its replicated device copy)
        self._refresh_shared()
        self.stats = EngineStats()
        self._slots = None
        # held by a run generator that is started and not finished: a second run beside it
        # (a generate call while a stream is open) wrote into the same slots
        self._running = threading.Lock()

    def _init_slots(self, rows: RowParams):
        return _init(
            self._graphdef,
            self._model_state,
            self._shared,
            rows,
            n_slots=self.n_slots,
            max_len=self.max_seq_len,
            sharding=self._split,
        )

    def _refresh_shared(self) -> None:
        """Uploads the shared tables (the schema pool changes as schemas are added).

        Only the leaves that changed since the last upload are placed again: the pool hands
        back the same host-side array for a table it did not touch, and the grammar and
        token bytes never change. Placing every leaf again cost a copy of every table (about
        45 MiB with the real vocabulary) to every device each time a schema request was
        admitted, 16 ms per admission on 4 simulated CPU devices."""
        placed = {}

        def put(x):
            if not isinstance(x, jax.Array):  # a host array could change in place
                return jax.device_put(x, self._replicated)
            hit = self._placed.get(id(x))
            y = hit[1] if hit is not None and hit[0] is x else jax.device_put(x, self._replicated)
            placed[id(x)] = (x, y)  # keeps x alive, so its id is not reused while cached
            return y

        shared = sl.Shared(self._grammar, self._token_bytes, self.schema_pool.pool)
        self._shared = jax.tree.map(put, shared)
        self._placed = placed  # only this upload's leaves: nothing accumulates

    # -------------------------------------------------------------- host loop
    def prompt_bucket(self, n: int) -> int:
        """The static prefill length for a prompt of ``n`` tokens: the smallest
        ``(2**k - 1) * 16 >= n`` (16, 48, 112, 240, 496, ...), capped at ``max_seq_len``.

        Geometric, so a few programs cover every length, and each an odd multiple of 16, the
        width the batch-invariant matmuls run at anyway (no padding on top of the bucket).
        """
        return prompt_bucket(n, self.max_seq_len)

    def warmup(self, rows: RowParams, prompt_lengths: Iterable[int] = (1,)) -> None:
        """Compiles the chunk loop at every one of :attr:`widths` and the prefill of every
        bucket the given prompt lengths fall in, so that a later workload of those lengths
        compiles nothing.

        ``rows``: any one-row RowParams of the kind the workload uses (for the shapes).
        """
        keys = [f"warmup-{n}" for n in prompt_lengths]
        reqs = [
            SlotRequest(key=k, prompt=[0] * n, rows=rows, max_tokens=1)
            for k, n in zip(keys, prompt_lengths)
        ]
        stats = self.stats
        for _ in self.run(reqs):
            pass
        self.stats = stats
        with self._running:  # no slot runs now: each width's chunk runs no step
            for width in self.widths if self._slots is not None else ():
                self._slots, _ = self._chunk(self.n_slots + 1, width)

    def run(self, requests: Iterable[SlotRequest | PassThrough]) -> Iterator[SlotResult]:
        """Decodes every request; yields each :class:`SlotResult` as its request finishes,
        and each :class:`PassThrough` item as it is pulled.

        ``requests`` is pulled at most :attr:`prefetch` items ahead of the slots, on a
        background thread when ``prefetch > 0`` (so the input is iterated on that thread).
        Left early (the caller stops reading, or ``requests`` raises), the requests still
        running are dropped: their slots are marked empty on the device and their schemas
        released from the pool, so the next run starts clean."""
        if not self._running.acquire(blocking=False):
            raise RuntimeError(
                "this engine is already running a stream (a stream or run generator neither"
                " exhausted nor closed, or a call on another thread): its slots hold that"
                " stream's requests. Finish that stream or call .close() on it first, or build"
                " a second Engine"
            )
        owners: list[_Running | None] = [None] * self.n_slots
        it = iter(requests)
        if self.prefetch:
            it = _Prefetch(it, self.prefetch)
        try:
            yield from self._run(it, owners)
        finally:
            self._running.release()
            if isinstance(it, _Prefetch):
                it.close()
            self._drop(owners)

    def _slots_lost(self) -> bool:
        """True when the slot state was given to a compiled call (donated) whose result never
        came back: an exception (Ctrl-C, a signal handler) raised between the call and the
        assignment of its result leaves only deleted arrays."""
        return self._slots is not None and any(x.is_deleted() for x in jax.tree.leaves(self._slots))

    def _drop(self, owners: list) -> None:
        """Frees the slots of requests a run left unfinished (pool handles, device rows)."""
        left = [s for s, owner in enumerate(owners) if owner is not None]
        for s in left:
            if owners[s].schema is not None:
                self.schema_pool.release(owners[s].schema)
            owners[s] = None
        if self._slots_lost():  # every request of the run is gone: start from new slots
            self._slots = None
        if left and self._slots is not None:
            finish = self._slots.finish
            cleared = finish.at[jnp.asarray(left)].set(EMPTY)
            self._slots = self._slots.replace(finish=jax.device_put(cleared, finish.sharding))

    def _run(self, it: Iterator, owners: list) -> Iterator[SlotResult]:
        stats = self.stats
        start = time.perf_counter()
        waiting: SlotRequest | None = None  # pulled from the iterator, not yet placed
        exhausted = False
        free = sorted(range(self.n_slots), key=self._slot_order)

        def pull():
            """The next request into ``waiting``; pass-through items are yielded back."""
            nonlocal waiting, exhausted
            while waiting is None and not exhausted:
                item = next(it, None)
                if isinstance(item, PassThrough):
                    yield item
                    continue
                waiting = item
                exhausted = item is None

        while True:
            t0 = time.perf_counter()
            yield from pull()
            added = False
            # refill once at least r slots are free (r = S: only an empty engine is refilled,
            # which is a static batch); the fill ends when the slots or the requests run out
            filling = len(free) >= self.refill_free
            while filling and free and waiting is not None:
                try:
                    handle = self._add_schema(waiting)
                except json_schema.PoolFull as err:
                    if any(owners):  # room comes back as the running schema rows finish
                        break
                    failed = _Running(waiting).result(EMPTY)._replace(error=err)
                    waiting = None
                    yield failed  # it cannot fit even alone: it fails alone
                    yield from pull()
                    continue
                added |= handle is not None
                slot = free.pop(0)
                self._place(slot, waiting, handle)
                owners[slot] = _Running(waiting, handle)
                waiting = None
                yield from pull()
            if added:
                self._refresh_shared()
            if filling and self._slots is not None:
                jax.block_until_ready(self._slots)  # so that the prefill time is its own
            t1 = time.perf_counter()
            stats.prefill_s += t1 - t0
            if not any(owners):
                break
            # While requests wait, leave once r slots are free (or, when free slots were left
            # unfilled because a schema waits for room in the pool, once one more is free);
            # once the input is exhausted, run on until every slot is done or K steps.
            if waiting is None:
                free_target = self.n_slots + 1
            elif len(free) < self.refill_free:
                free_target = self.refill_free
            else:
                free_target = len(free) + 1
            width = self._width(owners)
            self._slots, out = self._chunk(free_target, width)
            out = jax.device_get(out)
            t2 = time.perf_counter()
            stats.chunk_s += t2 - t1
            steps = int(out.steps)
            stats.chunks += 1
            stats.steps += steps
            stats.slot_steps += steps * self.n_slots
            stats.row_steps += steps * width * self.n_devices
            for s, owner in enumerate(owners):
                if owner is None:
                    continue
                # a running count (summing the parts' lengths at every chunk made the host's
                # work per chunk grow with the output length)
                n = int(out.n_out[s]) - owner.n
                if n:
                    owner.n += n
                    owner.tokens.append(out.tokens[s, :n])
                    owner.logprobs.append(out.logprobs[s, :n])
                    owner.top_ids.append(out.top_ids[s, :n])
                    owner.top_logprobs.append(out.top_logprobs[s, :n])
                    stats.tokens += n
                if int(out.finish[s]) != RUNNING:
                    if owner.schema is not None:
                        self.schema_pool.release(owner.schema)
                    owners[s] = None
                    free.append(s)
                    free.sort(key=self._slot_order)
                    stats.requests += 1
                    stats.host_s += time.perf_counter() - t2
                    yield owner.result(int(out.finish[s]))
                    t2 = time.perf_counter()
            stats.host_s += time.perf_counter() - t2
        stats.wall_s += time.perf_counter() - start

    def _slot_order(self, slot: int) -> tuple[int, int]:
        """The order free slots are taken in: lowest index on its device first, the devices
        in turn (so a few requests run in narrow chunks, one device's rows each)."""
        return slot % self._local, slot // self._local

    def _width(self, owners: list) -> int:
        """The narrowest of :attr:`widths` that holds every running slot of every device."""
        top = max((s % self._local for s, o in enumerate(owners) if o is not None), default=0)
        return next(w for w in self.widths if w > top)

    def _chunk(self, free_target: int, width: int):
        return _chunk(
            self._graphdef,
            self._model_state,
            self._shared,
            self._slots,
            jnp.int32(free_target),
            chunk_steps=self.chunk_steps,
            transforms=self.transforms,
            mesh=self.mesh,
            width=width,
        )

    def _add_schema(self, req: SlotRequest):
        """Writes the request's schema into the pool (host arrays); its handle, or None."""
        if req.schema is None:
            return None
        return self.schema_pool.add(req.schema)

    def _place(self, slot: int, req: SlotRequest, handle=None) -> None:
        n = len(req.prompt)
        if not 1 <= n or n + req.max_tokens > self.max_seq_len or req.max_tokens < 1:
            raise ValueError(
                f"request {req.key!r}: prompt {n} + max_tokens {req.max_tokens} must fit in "
                f"max_seq_len {self.max_seq_len} (checked by the API before this)"
            )
        if self._slots is None:
            self._slots = self._init_slots(req.rows)
        t = self.prompt_bucket(n)
        tokens = np.zeros((1, t), np.int32)
        tokens[0, :n] = req.prompt
        stops = _stop_tables(tuple(req.stops))
        # host (numpy) values straight into the jitted call: one transfer each in the
        # dispatch, where a jnp.asarray per value cost about as much as the prefill itself
        # for short prompts on a small model (half the host time of a request)
        self._slots = _admit(
            self._graphdef,
            self._model_state,
            self._shared,
            self._slots,
            np.int32(slot),
            tokens,
            np.array([n], np.int32),
            req.rows,
            np.array([req.json_mode], np.bool_),
            np.array([0 if handle is None else handle.start], np.int32),
            stops,
            np.array([req.max_tokens], np.int32),
            mesh=self.mesh,
        )

    def memory_per_slot(self) -> dict:
        """Device bytes each slot holds: its KV cache, history and the rest."""
        cfg = self.model_config
        itemsize = jnp.dtype(self._dtype).itemsize
        blk = cfg.attn_block
        length = -(-self.max_seq_len // blk) * blk
        kv = 2 * cfg.n_layers * cfg.n_kv_heads * length * cfg.head_dim * itemsize
        hist = cfg.vocab_size * 5
        logits = cfg.vocab_size * 4
        stops = 4 * 65 * 256 + 4 * 4
        return {
            "kv_cache": kv,
            "history": hist,
            "logits": logits,
            "stop_tables": stops,
            "total": kv + hist + logits + stops,
        }


# ------------------------------------------------------------------------------ compiled
# Module-level jitted functions with the static structure as static arguments, so engines
# with the same model structure, mesh and settings share compiled programs.


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("n_slots", "max_len", "sharding"))
def _init(graphdef, state, shared, rows, *, n_slots, max_len, sharding):
    slots = sl.init_slots(nnx.merge(graphdef, state), shared, n_slots, max_len, rows)
    return jax.lax.with_sharding_constraint(slots, sharding)


@functools.partial(
    jax.jit,
    static_argnums=(0,),
    static_argnames=("chunk_steps", "transforms", "mesh", "width"),
    donate_argnums=(3,),
)
def _chunk_jit(
    graphdef, state, shared, slots, free_target, *, chunk_steps, transforms, mesh, width
):
    def chunk(state, shared, slots, free_target):
        return sl.run_chunk(
            nnx.merge(graphdef, state),
            shared,
            slots,
            free_target,
            chunk_steps=chunk_steps,
            transforms=transforms,
            axis_name=_AXIS,
            width=width,
        )

    out_chunk = sl.ChunkOut(*([P(_AXIS)] * 6), steps=P())
    return jax.shard_map(
        chunk,
        mesh=mesh,
        in_specs=(P(), P(), P(_AXIS), P()),
        out_specs=(P(_AXIS), out_chunk),
        check_vma=False,
    )(state, shared, slots, free_target)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("mesh",), donate_argnums=(3,))
def _admit_jit(
    graphdef,
    state,
    shared,
    slots,
    slot,
    tokens,
    length,
    rows,
    json_on,
    schema,
    stops,
    budget,
    *,
    mesh,
):
    n_devices = mesh.devices.size

    def admit(state, shared, slots, slot, tokens, length, rows, json_on, schema, stops, budget):
        s_local = slots.finish.shape[0]
        local = slot - jax.lax.axis_index(_AXIS) * s_local
        mine = (local >= 0) & (local < s_local)
        index = jnp.clip(local, 0, s_local - 1)

        def fill(slots):
            logits, keys, values = sl.prefill(nnx.merge(graphdef, state), tokens, length)
            return sl.insert(
                slots,
                shared,
                index,
                mine,
                logits,
                keys,
                values,
                tokens,
                length,
                rows,
                json_on,
                schema,
                stops,
                budget,
            )

        # only the device that owns the slot runs the prefill
        return jax.lax.cond(mine, fill, lambda s: s, slots) if n_devices > 1 else fill(slots)

    return jax.shard_map(
        admit,
        mesh=mesh,
        in_specs=(P(), P(), P(_AXIS)) + (P(),) * 8,
        out_specs=P(_AXIS),
        check_vma=False,
    )(state, shared, slots, slot, tokens, length, rows, json_on, schema, stops, budget)


# The two programs every process runs, through jaxsample.engine.programs: kept on disk (when
# XLA's compilation cache is on) so that a new process neither traces nor lowers them.


def _chunk(graphdef, state, shared, slots, free_target, *, chunk_steps, transforms, mesh, width):
    return programs.run(
        "chunk",
        _chunk_jit,
        (graphdef,),
        (state, shared, slots, free_target),
        {"chunk_steps": chunk_steps, "transforms": transforms, "mesh": mesh, "width": width},
        donate=2,
        out_tree=lambda args: jax.tree.structure((args[2], sl.ChunkOut(*range(7)))),
        cacheable=not transforms,
    )


def _admit(graphdef, state, shared, slots, *request, mesh):
    return programs.run(
        "admit",
        _admit_jit,
        (graphdef,),
        (state, shared, slots, *request),
        {"mesh": mesh},
        donate=2,
        out_tree=lambda args: jax.tree.structure(args[2]),
    )
