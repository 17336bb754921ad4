"""`llmbus bench`: throughput and latency of llmbus over NATS (and through its HTTP bridge, and of any
OpenAI-compatible peer server), against in-process transformers baselines measured in the same run.

Phases (one progress line each on stderr):
0. Checks, so that a wrong URL, model, key or login fails in seconds: with --nats-url, a connection with the
   bench's NATS settings; with --http-url (which needs --nats-url: the bridge must front the same workers), one
   `GET /readyz`; with --peer-url, one short request to the peer.
1. Baselines, in this process, before any worker starts (so nothing competes for the cores): load the model with
   plain transformers and measure the eager ceiling (the transformers decode loop with a DynamicCache, greedy,
   at each batch size of the sweep), the in-process prefill time of the 1-client prompts, and the naive
   baseline (one `model.generate` per request, 8 at a time in threads). Then free it, unless --rounds N > 1
   keeps it to measure the ceiling again in each round (phase 3).
2. Start an embedded nats-server and `--workers N` worker processes (unless --nats-url), and with --http an
   `llmbus gateway` process (unless --http-url); wait until N workers answer `$SRV.PING` and the bridge's
   `/readyz` says ready; warm every target up.
3. For each concurrency C, back to back: C clients in a closed loop (each sends its next request when the last
   one is fully answered) over NATS through `BusClient.stream`, then through the bridge's
   `POST /v1/chat/completions` (--http), then the peer's (--peer-url). Same prompts, max_tokens, greedy,
   streaming for all three. With --rounds N, N times in alternating order (NATS, HTTP, peer, eager ceiling, then
   the reverse), each target's rounds one point; for N > 1 (unless --skip-baselines) the eager ceiling, measured
   while the stack is idle, is one of the targets, and the ratios use its rounds.
4. Print the ratios against the targets (PASS/MISS/N/A, or ERRORS when a point it uses had failed requests: its
   value is shown but cannot pass); write bench.json and bench.png under --out. A worker or the bridge that dies
   mid-sweep stops the sweep: the point it was found after is marked failed (ERRORS), and what was measured until
   then is still written, with the reason (`stopped`); the exit status is then 1. So are the baselines when the
   stack does not start (a worker that exits at its start: no point at all).
Every NATS and HTTP request names the same model: the one the bench's own workers serve, or on a --nats-url bus the
default model (`$SRV.INFO` metadata `default_model`), else its only one, else --served-model NAME. --request-timeout
is an idle timeout on both: the wait for the first chunk, then for each next one.
Ctrl-C, SIGTERM and SIGHUP stop the processes the bench started; so does the bench's death (PR_SET_PDEATHSIG).

What is measured, per target and concurrency: tokens/s (completion tokens of the answered requests over the
wall time of the point), requests/s, time to first token (first text chunk), inter-token latency (gaps between
text chunks), end-to-end latency, errors; for llmbus's own workers also the engine's counters from
`$SRV.STATS` (decode steps, mean decode batch, prefill forwards, prefix-cache reuse, and the seconds the engines
spent decoding and prefilling: the rest of the point's wall time they waited for work), and for every process
the bench started the CPU seconds it used during the point ("cores used" = CPU seconds / wall seconds).

How to read it:
- throughput_vs_ceiling (target >= 1.5, aim 2) and throughput_vs_ceiling_at_1 (>= 2) compare the whole stack,
  bus included, with the plain transformers loop at the same batch size: above 1 means the engine decodes faster
  than eager transformers could even without a bus.
- http_over_nats (>= 0.95): the bridge's cost, measured back to back against the same workers.
- The ceiling takes the faster of wall-time and median-step rates, so noise from other processes never makes a
  target easier to meet; the notes say when the load average shows such noise.
- A peer's tokens come from its final usage chunk (`stream_options.include_usage`), else from counting content
  deltas (the JSON's `token_count_source` says which). Peers stop at different places than llmbus, so compare
  tokens/s and ITL rather than requests/s.

--pin, and why N pinned workers give less than N times one: each worker gets `--cores-per-worker` whole physical
cores of its own (default: an equal share), with every hyper-thread of them (from sysfs topology; where it cannot
be read, each CPU counts as a core), and a torch thread per logical CPU. Only the workers are pinned. The bench's
clients (one Python process: NATS or HTTP framing, JSON decoding and timing for every token of every stream), the
nats-server (every token chunk passes through it twice: in from a worker, out to a client) and the bridge run
wherever the kernel puts them. With one worker on core 0 of two, they run on the free core; with one worker on
each core they take their share from the workers, and a worker's own asyncio thread (publishing each token)
shares its one core with its engine. The workers also share the memory bus and last-level cache: every decode
step of every worker streams its own copy of the weights (270 MB in bf16 for SmolLM2-135M), so two workers read
twice the bytes through the same memory bandwidth. The "cores used" column shows the first two effects directly;
the third shows as a lower decode rate per worker at the same batch size.
"""

from llmbus.bench.main import main
from llmbus.bench.verdicts import TARGETS

__all__ = ["TARGETS", "main"]
