"""Generation that survives a node dropping out: when a stage dies, re-plan
on the nodes left (if the model still fits), reload what moved, replay the
session's tokens (prompt + what was generated) to rebuild the caches, and go
on. When it no longer fits, stop with an error that names the node."""

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Optional, Sequence

from clusterd.coordinator.peers import PeerError
from clusterd.coordinator.pipeline import (GenerationError, GenerationStats, LoadedStage,
                                           Pipeline, Sampling)

# Survivors -> their newly loaded stages (plan, fetch files, load); raises
# PeerError or ValueError (e.g. SplitError) when the model cannot be placed.
Replan = Callable[[Sequence[object]], list[LoadedStage]]

HEALTH_TIMEOUT_S = 3.0


class HealingPipeline:
    def __init__(self, nodes: Sequence[object], stages: Sequence[LoadedStage], replan: Replan,
                 *, prefill_step_size: int = 2048, max_recoveries: int = 3,
                 on_note: Callable[[str], None] = lambda t: None):
        self.nodes = list(nodes)  # each has .peer (PeerHandle)
        self.stages = list(stages)
        self._replan = replan
        self._prefill_step_size = prefill_step_size
        self._max_recoveries = max_recoveries
        self._on_note = on_note
        self.recoveries = 0

    def generate(self, prompt: Sequence[int], max_tokens: int, sampling: Sampling,
                 stop_ids: Sequence[int] = (), stats: Optional[GenerationStats] = None
                 ) -> Iterator[int]:
        stats = stats if stats is not None else GenerationStats()
        produced: list[int] = []
        while True:
            attempt = GenerationStats()
            pipeline = Pipeline(self.stages, prefill_step_size=self._prefill_step_size)
            try:
                for token in pipeline.generate([*prompt, *produced], max_tokens - len(produced),
                                               sampling, stop_ids, attempt):
                    produced.append(token)
                    if len(produced) == 1:
                        stats.ttft_s = attempt.ttft_s
                    yield token
                stats.finish_reason = attempt.finish_reason
                break
            except GenerationError as e:
                self._recover(e)
            finally:
                stats.prompt_tokens = len(prompt)
                stats.tokens = list(produced)
                stats.decode_s += attempt.decode_s

    def _recover(self, error: GenerationError) -> None:
        dead = self._dead_nodes()
        if not dead:
            raise error  # not a node loss: nothing to heal
        names = ", ".join(f"{n.peer.name} ({n.peer.address})" for n in dead)
        if self.recoveries >= self._max_recoveries:
            raise GenerationError(f"{error}; gave up after {self.recoveries} recoveries") from None
        survivors = [n for n in self.nodes if n not in dead]
        if not survivors:
            raise GenerationError(f"every node is gone (last: {names})") from None
        self._on_note(f"node {names} dropped out; re-planning on the {len(survivors)} "
                      "node(s) left and replaying the session")
        try:
            self.stages = self._replan(survivors)
        except (PeerError, ValueError) as e:
            raise GenerationError(f"node {names} dropped out and the model cannot go on "
                                  f"without it: {e}") from None
        self.nodes = survivors
        self.recoveries += 1

    def _dead_nodes(self) -> list[object]:
        def alive(node) -> bool:
            try:
                node.peer.health(timeout=HEALTH_TIMEOUT_S)
                return True
            except PeerError:
                return False

        with ThreadPoolExecutor(len(self.nodes)) as pool:
            flags = list(pool.map(alive, self.nodes))
        return [n for n, ok in zip(self.nodes, flags) if not ok]
