"""Pipeline-parallel inference: one model over several cards (and hosts) on Ray.

    from llmfab.host.pipeline import Pipeline
    with Pipeline.from_model(model, config, cards=2, backend="golden") as pipe:
        res = pipe.generate(prompt_ids, 16)                 # a GenerateResult, as Device.generate
        many = pipe.generate_many([p1, p2, p3, p4], 16)     # four requests in flight
        lg = pipe.logits(token_ids)                         # [T, vocab] float32

Each stage (compiler/partition.py: layers [a, b), one bundle) runs in a Ray
actor (:class:`StageRunner`) on any backend (golden, rtl). The host drives
the stages: a step of a request is a chain of actor calls, stage i's output
(the hidden state, ``dim`` float32 per token) handed to stage i+1 through
Ray's object store without coming back to the driver; the last stage returns
the logits. Several requests in flight keep the stages busy at once (stage 0
runs request B's step while stage 1 runs request A's). Each stage keeps one KV
cache per request: the resident request's cache is in the device's KV region,
the others are saved in host memory and swapped in when their step comes.

Without an address, a local Ray instance is started (and shut down by
:meth:`Pipeline.close`); ``ray_address`` joins a running cluster. Every wait
has a timeout; a stage that fails (its actor died, its backend raised) ends
the request with one :class:`~llmfab.core.errors.BackendError` line naming
the stage.
"""

from __future__ import annotations

import itertools
import os
import time

import numpy as np

from llmfab.core.errors import BackendError, LlmfabError
from llmfab.host.runtime import GenerateResult

#: backends a stage can run on
STAGE_BACKENDS = ("golden", "rtl")
#: seconds a pipeline waits for any stage's answer before giving up (``--stage-timeout``)
DEFAULT_TIMEOUT = 300.0


def stage_name(manifest: dict) -> str:
    st = manifest["stage"]
    a, b = st["layers"]
    return f"stage {st.get('index', '?')} (layers {a}-{b - 1})"


class StageRunner:
    """One stage's device, with a KV cache per request (run in a Ray actor by :class:`Pipeline`).

    ``forward(req, x)``: ``x`` is token ids (the first stage) or the hidden state
    ``[n, dim]`` float32 (the others); the result is the hidden state ``[n, dim]``
    or, on the last stage, the logits (``rows="last"``: only the last token's, the runs
    before the last through the KV-only prefill programs, which skip the LM head).
    """

    def __init__(self, bundle, backend: str = "golden", config=None, **device_kw):
        from llmfab.boards.config import load_config
        if backend not in STAGE_BACKENDS:
            raise BackendError(f"unknown stage backend '{backend}' (choose from {', '.join(STAGE_BACKENDS)})")
        if "stage" not in bundle.manifest:
            raise BackendError("the bundle is not a pipeline stage (compile with --cards)")
        config = config or load_config(bundle.manifest["config_name"])
        self.bundle, self.backend = bundle, backend
        man = bundle.manifest
        st = man["stage"]
        self.name = stage_name(man)
        self.first, self.last = bool(st["first"]), bool(st["last"])
        self.dim = int(st["hidden_dim"])
        self.context = int(man["context"])
        self.vocab = int(man["model"]["vocab_size"])
        mm = man["memory_map"]
        self.kv0, self.kvn = (int(x) for x in mm["kv"])
        hd = int(man["model"]["head_dim"])
        self.kv_row = hd * 2                          # one position of one head's K (or V), fp16
        self.kv_block = self.context * self.kv_row    # K (or V) of one head of one layer
        self.h_in = int(mm["hidden_in"][0]) if not self.first else None
        self.h_out = int(mm["hidden_out"][0]) if not self.last else None
        if backend == "golden":
            from llmfab.host.golden_backend import GoldenDevice
            self.dev = GoldenDevice(None, config, bundle=bundle, **device_kw)
            self.buckets = list(self.dev.buckets)
        else:
            from llmfab.host.rtl_backend import RtlDevice
            self.dev = RtlDevice(None, config, bundle=bundle, **device_kw)
            self.buckets = list(self.dev.buckets)
        self.dev.reset()
        self.states = {}          # request -> (position, saved KV bytes or None when resident)
        self.resident = None
        self.steps = 0
        self.busy_s = 0.0

    # ---- the device's memory, whichever backend -------------------------------------------
    def _read(self, addr, n) -> np.ndarray:
        if self.backend == "golden":
            return self.dev.golden.hbm[addr:addr + n].copy()
        return np.asarray(self.dev.acc.read_hbm(addr, n), np.uint8).copy()

    def _write(self, addr, data) -> None:
        data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if self.backend == "golden":
            self.dev.golden.hbm[addr:addr + data.size] = data
        else:
            self.dev.acc.write_hbm(addr, data)

    def _kv_rows(self, pos: int) -> list:
        """(address, bytes) of the KV rows of positions [0, pos): the front of every head's K and V."""
        return [(self.kv0 + k * self.kv_block, pos * self.kv_row) for k in range(self.kvn // self.kv_block)]

    def _save(self, pos: int) -> np.ndarray:
        if self.backend == "golden":
            blocks = self.dev.golden.hbm[self.kv0:self.kv0 + self.kvn].reshape(-1, self.kv_block)
            return blocks[:, :pos * self.kv_row].copy()
        return np.stack([self._read(a, n) for a, n in self._kv_rows(pos)]) if pos else None

    def _restore(self, pos: int, saved) -> None:
        if not pos:
            return
        if self.backend == "golden":
            blocks = self.dev.golden.hbm[self.kv0:self.kv0 + self.kvn].reshape(-1, self.kv_block)
            blocks[:, :pos * self.kv_row] = saved
        else:
            for (a, _), row in zip(self._kv_rows(pos), saved):
                self._write(a, row)

    def _switch(self, req, start: bool) -> int:
        """Make ``req``'s KV cache resident; returns its position.

        Only the rows of positions already run are saved and restored: a step reads the
        cache below its position, and writes its own rows before it reads them.
        """
        if start:
            self.states.pop(req, None)
        if self.resident != req:
            if self.resident is not None and self.resident in self.states:
                pos, _ = self.states[self.resident]
                self.states[self.resident] = (pos, self._save(pos))
            if req in self.states:
                self._restore(*self.states[req])
            self.resident = req
        if req not in self.states:
            self.states[req] = (0, None)
        pos, _ = self.states[req]
        self.states[req] = (pos, None)
        return pos

    def _check(self, r):
        from llmfab.compiler import isa
        if getattr(r, "timed_out", False):
            raise BackendError(f"{self.name}: the accelerator's watchdog fired")
        if r.status != isa.STATUS_OK:
            raise BackendError(f"{self.name}: the device stopped with status {r.status} "
                               f"({isa.STATUS_NAMES.get(r.status, '?')}) at instruction {r.pc}")

    def _run(self, pos, chunk, T, logits: bool | str = True):
        """Run ``T`` tokens (ids or hidden rows) at ``pos``; the output rows ``[T, dim|vocab]``
        (the last stage with ``logits=False``: bucket T's KV-only program, ``None``; with
        ``"last"``: its last-logits program, ``[1, vocab]``)."""
        from llmfab.compiler.bundle import logits_rows, prefill_program
        if self.first:
            tok = int(chunk[0]) if T == 1 else 0
            if not 0 <= tok < self.vocab or any(not 0 <= int(t) < self.vocab for t in chunk):
                raise BackendError(f"token id out of range (vocab size {self.vocab})")
        else:
            tok = 0
            self._write(self.h_in, np.asarray(chunk, np.float32))
        if self.backend == "golden":
            g = self.dev.golden
            if T == 1:
                r = g.run(pos, tok)
            else:
                if self.first:
                    g.stage_tokens(chunk)
                r = g.run(pos, 0, prefill_program(T, logits))
            self._check(r)
            if not logits:
                return None
            if self.last:
                return g.logits()[None] if T == 1 else g.prefill_logits(logits_rows(T, logits))
        else:
            acc = self.dev.acc
            self.dev.use_program(T, logits)
            if T > 1 and self.first:
                for addr, row in self.bundle.prefill_token_rows(chunk):
                    acc.write_hbm(addr, row)
            r = acc.run(pos, tok, ntok=T, timeout_cycles=self.dev.timeout_cycles)
            self._check(r)
            if not logits:
                return None
            if self.last:
                if T == 1:
                    return acc.logits().copy()[None]
                return self.bundle.prefill_logits(logits_rows(T, logits), acc.read_hbm)
        return self._read(self.h_out, T * self.dim * 4).view(np.float32).reshape(T, self.dim)

    def forward(self, req, x, start: bool = False, rows: str = "all") -> np.ndarray:
        from llmfab.host.runtime import prompt_plan
        t0 = time.perf_counter()
        x = list(x) if self.first else np.asarray(x, np.float32).reshape(-1, self.dim)
        pos = self._switch(req, start)
        n = len(x)
        if pos + n > self.context:
            raise BackendError(f"{self.name}: context overflow: {n} tokens at position {pos} exceed "
                               f"the compiled context {self.context}")
        out, i = [], 0
        for T, logits in prompt_plan(n, self.buckets, pos, self.dev.prefill_align,
                                     self.bundle.prefill_kv, last=rows == "last",
                                     last_only=self.bundle.prefill_last):
            y = self._run(pos, x[i:i + T], T, logits)
            if y is not None:
                out.append(y)
            pos += T
            i += T
            self.steps += 1
        self.states[req] = (pos, None)
        self.busy_s += time.perf_counter() - t0
        y = np.concatenate(out, axis=0)
        return y[-1:] if rows == "last" else y

    def release(self, req) -> None:
        self.states.pop(req, None)
        if self.resident == req:
            self.resident = None

    def info(self) -> dict:
        return {"stage": self.name, "backend": self.backend, "context": self.context,
                "buckets": self.buckets, "steps": self.steps, "busy_s": round(self.busy_s, 3),
                "requests": len(self.states)}

    def close(self) -> None:
        if hasattr(self.dev, "close"):
            self.dev.close()


def _ray():
    try:
        import ray
    except ImportError as e:       # pragma: no cover - ray is a dependency
        raise BackendError(f"multi-card runs need Ray (pip install ray): {e}") from None
    return ray


_RAY_INIT = dict(include_dashboard=False, log_to_driver=False, configure_logging=True)


def start_local_ray(num_cpus: int = 2, *, temp_dir: str | None = None, attempts: int = 3) -> None:
    """Start a local Ray instance (no dashboard; ``temp_dir``: Ray's files, default /tmp/ray).

    The stage actors are the work: they run at the driver's priority, not at Ray's default
    worker niceness (15), which starves them on a busy host. Ray gives its node 30 s to
    come up; on a loaded host that can pass, so the start is tried ``attempts`` times.
    """
    import logging
    ray = _ray()
    os.environ.setdefault("RAY_worker_niceness", "0")
    kw = dict(_RAY_INIT, logging_level=logging.ERROR, num_cpus=num_cpus)
    if temp_dir:
        kw["_temp_dir"] = temp_dir
    for k in range(attempts):
        try:
            ray.init(**kw)
            return
        except Exception as e:      # noqa: BLE001 - Ray raises bare Exceptions too
            if ray.is_initialized():
                ray.shutdown()
            if k == attempts - 1:
                raise BackendError(f"cannot start a local Ray instance: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class Pipeline:
    """A model's stages as Ray actors, driven from this process (see the module docstring)."""

    def __init__(self, bundles, *, backend: str = "golden", configs=None, ray_address: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, num_cpus: int = 2, actor_options: dict | None = None,
                 device_kw: dict | None = None):
        if not bundles:
            raise BackendError("a pipeline needs at least one stage")
        if backend not in STAGE_BACKENDS:
            raise BackendError(f"backend '{backend}' cannot run pipeline stages "
                               f"(choose from {', '.join(STAGE_BACKENDS)})")
        ray = _ray()
        self.timeout = float(timeout)
        self.backend = backend
        self.names = [stage_name(b.manifest) for b in bundles]
        self.context = min(int(b.manifest["context"]) for b in bundles)
        self.vocab = int(bundles[-1].manifest["model"]["vocab_size"])
        self._owns_ray = False
        if not ray.is_initialized():
            if ray_address:
                try:
                    ray.init(address=ray_address, **_RAY_INIT)
                except Exception as e:      # noqa: BLE001 - Ray raises bare Exceptions too
                    raise BackendError(f"cannot join the Ray cluster at {ray_address}: "
                                       f"{_one_line(e)}") from None
            else:
                start_local_ray(num_cpus)
            self._owns_ray = True
        opts = {"num_cpus": 0, "max_restarts": 0,
                "runtime_env": {"env_vars": {"OPENBLAS_NUM_THREADS": "1"}}}
        opts.update(actor_options or {})
        cls = ray.remote(StageRunner)
        configs = configs or [None] * len(bundles)
        self.actors = [cls.options(**opts).remote(b, backend, c, **(device_kw or {}))
                       for b, c in zip(bundles, configs)]
        self._req = itertools.count()
        try:
            self._get([a.info.remote() for a in self.actors], "starting the stages")
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_model(cls, model, config, cards: int, *, placement=None, progress: bool = False,
                   sparsity=None, **kw) -> "Pipeline":
        """Plan and compile ``model`` over ``cards`` cards of ``config`` and start the stages."""
        from llmfab.compiler.partition import compile_stages, plan_stages
        stages = plan_stages(model, [config] * cards, sparsity=sparsity, layers=placement)
        bundles = compile_stages(model, stages, sparsity=sparsity, progress=progress)
        return cls(bundles, configs=[s.config for s in stages], **kw)

    # ---- Ray waits, all with a timeout ---------------------------------------------------------
    def _stage_error(self, refs, exc, first: int = 0, fallback: bool = True) -> BackendError | None:
        """The error of the first failed stage among one step's ``refs`` (``refs[k]`` is stage
        ``first + k``'s call); when none failed, a general error (``fallback``) or None."""
        ray = _ray()
        from ray import exceptions as rex
        for i, ref in enumerate(refs, first):
            ready, _ = ray.wait([ref], timeout=min(self.timeout, 5.0))
            if not ready:
                continue
            try:
                ray.get(ref, timeout=1.0)
            except rex.RayActorError:
                return BackendError(f"{self.names[i]} failed: its Ray actor died")
            except rex.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, LlmfabError):
                    msg = _one_line(cause)
                    return BackendError(msg if msg.startswith(self.names[i]) else f"{self.names[i]}: {msg}")
                return BackendError(f"{self.names[i]} failed: {_one_line(cause or e)}")
            except Exception as e:     # noqa: BLE001 - any other Ray failure still names the stage
                return BackendError(f"{self.names[i]} failed: {_one_line(e)}")
        return BackendError(f"the pipeline failed: {_one_line(exc)}") if fallback else None

    def _get(self, refs, what: str):
        ray = _ray()
        from ray import exceptions as rex
        try:
            return ray.get(refs, timeout=self.timeout)
        except rex.GetTimeoutError:
            raise BackendError(f"{what}: no answer within {self.timeout:g} s") from None
        except (rex.RayError, LlmfabError) as e:
            # refs: one call per stage, in stage order (each stage's own, not a chain)
            for i, r in enumerate(refs):
                err = self._stage_error([r], e, first=i, fallback=False)
                if err is not None:
                    raise BackendError(f"{what}: {err}") from None
            raise BackendError(f"{what}: {_one_line(e)}") from None

    def _submit(self, req, x, start: bool, rows: str):
        refs = []
        for i, a in enumerate(self.actors):
            x = a.forward.remote(req, x, start, rows if i == len(self.actors) - 1 else "all")
            refs.append(x)
        return refs

    # ---- the runtime API (host/runtime.py's Device) ---------------------------------------------
    def logits(self, tokens) -> np.ndarray:
        """Teacher-forced logits for every position of ``tokens`` (float32 ``[T, vocab]``)."""
        tokens = [int(t) for t in tokens]
        if len(tokens) > self.context:
            raise BackendError(f"the token sequence is {len(tokens)} tokens but the pipeline holds a "
                               f"context of {self.context} positions: shorten it")
        req = f"r{next(self._req)}"
        refs = self._submit(req, tokens, True, "all")
        try:
            return self._wait_one(refs)
        finally:
            for a in self.actors:
                a.release.remote(req)

    def _wait_one(self, refs):
        ray = _ray()
        ready, _ = ray.wait([refs[-1]], timeout=self.timeout)
        if not ready:
            raise self._timeout_error(refs)
        try:
            return ray.get(refs[-1], timeout=self.timeout)
        except Exception as e:      # noqa: BLE001
            raise self._stage_error(refs, e) from None

    def _timeout_error(self, refs) -> BackendError:
        ray = _ray()
        for i, r in enumerate(refs):
            if not ray.wait([r], timeout=0)[0]:
                return BackendError(f"{self.names[i]} gave no answer within {self.timeout:g} s")
        return BackendError(f"the pipeline gave no answer within {self.timeout:g} s")

    def generate(self, prompt, max_tokens: int, *, stop_ids=(), progress=None) -> GenerateResult:
        """Greedy decoding of one request through the stages (as :meth:`Device.generate`)."""
        return self.generate_many([prompt], max_tokens, stop_ids=stop_ids,
                                  progress=(lambda i, t: progress(t)) if progress else None)[0]

    def generate_many(self, prompts, max_tokens: int, *, stop_ids=(), progress=None) -> list:
        """Greedy decoding of several requests in flight at once; one GenerateResult each.

        ``progress(i, token)`` is called for every token of request ``i``.
        """
        ray = _ray()
        if max_tokens < 1:
            raise BackendError(f"max_tokens must be at least 1, not {max_tokens}")
        reqs = []
        for p in prompts:
            p = [int(t) for t in p]
            if not p:
                raise BackendError("the prompt is empty: give at least one token")
            if len(p) > self.context:
                raise BackendError(f"the prompt is {len(p)} tokens but the pipeline holds a context of "
                                   f"{self.context} positions: shorten it")
            reqs.append({"id": f"r{next(self._req)}", "prompt": p, "out": [], "stop": "length"})
        pending = {}
        t0 = time.perf_counter()
        for i, r in enumerate(reqs):
            r["t0"] = time.perf_counter()
            refs = self._submit(r["id"], r["prompt"], True, "last")
            pending[refs[-1]] = (i, refs)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.timeout)
                if not ready:
                    raise self._timeout_error(next(iter(pending.values()))[1])
                i, refs = pending.pop(ready[0])
                r = reqs[i]
                try:
                    lg = ray.get(ready[0], timeout=self.timeout)
                except Exception as e:      # noqa: BLE001
                    raise self._stage_error(refs, e) from None
                if not r["out"]:
                    r["t1"] = time.perf_counter()
                nxt = int(np.argmax(lg[-1]))
                r["out"].append(nxt)
                if progress:
                    progress(i, nxt)
                done = True
                if nxt in stop_ids:
                    r["stop"] = "eos"
                elif len(r["out"]) >= max_tokens:
                    pass
                elif len(r["prompt"]) + len(r["out"]) > self.context:
                    r["stop"] = "context"
                else:
                    done = False
                if done:
                    r["t2"] = time.perf_counter()
                    for a in self.actors:
                        a.release.remote(r["id"])
                else:
                    refs = self._submit(r["id"], [nxt], False, "last")
                    pending[refs[-1]] = (i, refs)
        except BaseException:
            # the other requests end too; their steps already queued finish on the actors
            for r in reqs:
                for a in self.actors:
                    a.release.remote(r["id"])
            raise
        self.last_seconds = time.perf_counter() - t0
        return [GenerateResult(tokens=r["out"], prompt_tokens=r["prompt"], seconds=r["t2"] - r["t0"],
                               prefill_seconds=r["t1"] - r["t0"], stop=r["stop"],
                               stats={"stages": len(self.actors), "backend": self.backend})
                for r in reqs]

    def stats(self) -> list:
        return self._get([a.info.remote() for a in self.actors], "reading the stages' counters")

    def close(self) -> None:
        ray = _ray()
        for a in getattr(self, "actors", []):
            try:
                ray.kill(a)
            except Exception:    # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
