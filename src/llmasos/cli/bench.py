"""`llmasos bench`: the benchmarks, one command per workload. Without a subcommand it times the CPU
workloads C1-C4 (bench/cpu.py); `serve`, `guards`, `agents`, `prefix-disk`, `lora`, `draft`, `kernels`,
`footprint`, `quality`, `train` and `data` each run the module of that name in llmasos.bench, which measures
and prints one table. The flags are here; the measuring is there, in plain functions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmasos.bench.data import DEFAULT_STEPS as DATA_STEPS
from llmasos.cli.app import ACTIVATION_BITS_HELP, app
from llmasos.config import SPECULATIVE_TOKENS

MARKDOWN_HELP = "also write the table as Markdown"

bench_app = typer.Typer(
    help="Benchmarks: the CPU workloads C1-C4, or one of the commands below.", invoke_without_command=True
)
app.add_typer(bench_app, name="bench")


@bench_app.callback()
def bench(
    ctx: typer.Context,
    workloads: Annotated[str, typer.Option(help="comma-separated, of C1,C2,C3,C4,C4w,C5")] = "C1,C2,C3,C4",
    peers: Annotated[str, typer.Option(help="comma-separated, of the peers")] = "transformers,llama.cpp",
    model: Annotated[str, typer.Option(help="the model every system runs")] = "smollm2",
    output: Annotated[Path | None, typer.Option(help=MARKDOWN_HELP)] = None,
    activation_bits: Annotated[int, typer.Option(help=ACTIVATION_BITS_HELP)] = 16,
    num_speculative_tokens: Annotated[
        int, typer.Option(help="C5: most drafted tokens per step")
    ] = SPECULATIVE_TOKENS["ngram"],
) -> None:
    """Time the CPU workloads C1-C4 (decode, prompt, concurrency, cold start) against peers, C4w (a
    start through a warm `llmasos serve`) and C5 (speculative decoding); one table."""
    if ctx.invoked_subcommand is not None:
        return
    from llmasos.bench.cpu import run_bench

    run_bench(
        model,
        workloads.split(","),
        peers.split(","),
        output,
        activation_bits,
        num_speculative_tokens=num_speculative_tokens,
    )


@bench_app.command()
def serve(
    url: Annotated[
        str, typer.Option(help="a running server (llmasos serve MODEL)")
    ] = "http://127.0.0.1:8000",
    model: Annotated[str, typer.Option(help="the model the server serves")] = "smollm2",
    num_requests: int = 64,
    request_rate: Annotated[
        float, typer.Option(help="Poisson arrivals per second (inf: all at once)")
    ] = float("inf"),
    max_concurrency: int = 16,
    prompt_len: int = 128,
    output_len: int = 64,
    offline: Annotated[
        bool, typer.Option(help="also run the kernel offline: the server/kernel ratio")
    ] = True,
    dashboard_pairs: Annotated[
        int,
        typer.Option(
            help="the cost of watching: run the load this many times without and as many with "
            "/api/stats polled every second, alternating (0: not)"
        ),
    ] = 0,
    api_key: Annotated[str | None, typer.Option(envvar="LLMASOS_API_KEY")] = None,
    output: Annotated[Path | None, typer.Option(help=MARKDOWN_HELP)] = None,
    llama_server: Annotated[
        Path | None,
        typer.Option(
            help="instead: start `llmasos serve MODEL` and this llama-server binary on MODEL's GGUF "
            "(max-concurrency slots), and run the same load through each"
        ),
    ] = None,
    rounds: Annotated[
        int, typer.Option(help="with --llama-server: rounds, alternating which server goes first")
    ] = 1,
) -> None:
    """Workload G3: TTFT, TPOT, ITL and throughput of a running server, beside the kernel offline (or
    beside llama.cpp's own server, both started here)."""
    from llmasos.bench.serve import format_table, offline_throughput, run_serve_bench, watch_cost

    if llama_server is not None:
        _against_llama_server(
            model, llama_server, num_requests, max_concurrency, prompt_len, output_len, rounds, output
        )
        return

    load = dict(
        base_url=url, model=model, num_requests=num_requests, request_rate=request_rate,
        max_concurrency=max_concurrency, prompt_len=prompt_len, output_len=output_len, api_key=api_key,
    )  # fmt: skip
    watched = watch_cost(dashboard_pairs, **load) if dashboard_pairs else None
    result = watched.plain[0] if watched else run_serve_bench(**load)
    peer = (
        offline_throughput(model, num_requests, prompt_len, output_len, max_concurrency) if offline else None
    )
    format_table(result, peer, output, watched)


def _against_llama_server(
    model: str, binary: Path, num_requests: int, slots: int, prompt_len: int, output_len: int, rounds: int,
    output: Path | None,
) -> None:  # fmt: skip
    from llmasos.bench.common import add_speedups, report
    from llmasos.bench.serve_peers import compare_with_llama_server

    rows, _ = compare_with_llama_server(model, binary, num_requests, slots, prompt_len, output_len, rounds)
    add_speedups(rows)
    notes = [f"{num_requests} requests x {prompt_len} prompt + {output_len} output tokens, all at once"]
    report(rows, model, notes, output)


@bench_app.command()
def guards(
    model: Annotated[str, typer.Option(help="the model the servers serve")] = "smollm2",
    texts: Annotated[int, typer.Option(help="texts per stage and kind (with / without PII)")] = 200,
    throughput: Annotated[
        bool, typer.Option(help="also run G3 against servers without / with guards")
    ] = True,
    guard_policy: Annotated[
        Path | None, typer.Option(help="the policy to measure (default: redact every category)")
    ] = None,
    num_requests: int = 64,
    max_concurrency: int = 16,
    prompt_len: int = 128,
    output_len: int = 64,
    kv_cache_gib: Annotated[float | None, typer.Option(help="KV cache of the servers")] = None,
    output: Annotated[Path | None, typer.Option(help=MARKDOWN_HELP)] = None,
    labelled: Annotated[
        bool,
        typer.Option(help="instead: the secrets guard's precision and recall on its labelled set (no model)"),
    ] = False,
) -> None:
    """What the guards cost: latency per request and per streamed delta, and G3 throughput with / without."""
    from llmasos.bench.guards import format_labelled_table, format_table, measure_labelled, run_guard_bench

    if labelled:
        format_labelled_table(measure_labelled(), output)
        return

    result = run_guard_bench(
        model, texts, throughput, guard_policy, num_requests, max_concurrency, prompt_len, output_len,
        kv_cache_gib,
    )  # fmt: skip
    format_table(result, output)


@bench_app.command()
def agents(
    model: Annotated[str, typer.Option(help="the model the agents run on")] = "smollm2",
    num_agents: Annotated[int, typer.Option(help="agent programs run at once")] = 8,
    num_turns: Annotated[int, typer.Option(help="turns per agent (a tool call between two)")] = 4,
    tool_latency: Annotated[float, typer.Option(help="seconds each tool call sleeps")] = 0.5,
    prompt_words: Annotated[int, typer.Option(help="words in each agent's first message")] = 150,
    output_len: Annotated[int, typer.Option(help="tokens each turn generates")] = 16,
    num_kv_blocks: Annotated[int, typer.Option(help="KV-cache blocks (of 16 tokens) of each engine")] = 96,
    swap_blocks: Annotated[
        int | None,
        typer.Option(
            help="CPU blocks that swap+las swaps context out to",
            show_default="num-agents x num-kv-blocks, every agent's context",
        ),
    ] = None,
    configs: Annotated[str, typer.Option(help="comma-separated, of baseline,pin+las,swap+las")] = (
        "baseline,pin+las,swap+las"
    ),
    output: Annotated[Path | None, typer.Option(help=MARKDOWN_HELP)] = None,
) -> None:
    """N agents x M turns with tool latency: program completion p50/p99, agent throughput and prefill
    tokens recomputed per turn, FCFS without context preservation against LAS with pinned or swapped
    context, on engines with the same KV cache."""
    from llmasos.bench.agents import format_agent_table, run_agent_bench

    rows = run_agent_bench(
        model, num_agents, num_turns, tool_latency, prompt_words=prompt_words, output_len=output_len,
        num_kv_blocks=num_kv_blocks, configs=configs.split(","), swap_blocks=swap_blocks,
    )  # fmt: skip
    format_agent_table(rows, output)


@bench_app.command("prefix-disk")
def prefix_disk(
    model: Annotated[str, typer.Option(help="the model every process runs")] = "smollm2",
    prefix_tokens: Annotated[
        int, typer.Option(min=16, help="tokens of the prefix shared across the restart")
    ] = 2000,
    rounds: Annotated[int, typer.Option(min=1, help="rounds (a fresh prefix each); the median counts")] = 2,
    output: Annotated[Path | None, typer.Option(help=MARKDOWN_HELP)] = None,
) -> None:
    """TTFT of a request whose long prefix an earlier process computed (the KV disk cache, read back after
    a restart) against the same request on a cold engine; each system a fresh process."""
    from llmasos.bench.prefix_disk import run_prefix_disk_bench

    run_prefix_disk_bench(model, prefix_tokens, rounds, output)


@bench_app.command()
def lora(
    model: Annotated[str, typer.Option(help="the base model of the adapters")] = "smollm2",
    adapters: Annotated[int, typer.Option(help="LoRA adapters mixed in the batch")] = 8,
    requests: Annotated[int, typer.Option(help="requests at once")] = 16,
    max_tokens: Annotated[int, typer.Option(help="new tokens per request")] = 32,
    rank: Annotated[int, typer.Option(help="the adapters' LoRA rank")] = 8,
    repeats: Annotated[int, typer.Option(help="timed batches per system; the best counts")] = 3,
    rounds: Annotated[
        int, typer.Option(min=1, help="passes over the systems in turn; each system's best counts")
    ] = 1,
    output: Annotated[Path | None, typer.Option(help=MARKDOWN_HELP)] = None,
) -> None:
    """Many LoRA adapters in one batch over one base model, beside one merged model and the base alone."""
    from llmasos.bench.common import report
    from llmasos.bench.lora import run_lora_bench

    rows, notes = run_lora_bench(model, adapters, requests, max_tokens, rank, repeats, rounds)
    report(rows, model, notes, output)


@bench_app.command()
def draft(
    target: Annotated[
        str, typer.Option(help="the model that verifies (smollm2-f32: smollm2 as float32, made once)")
    ] = "smollm2-f32",
    draft_model: Annotated[str, typer.Option(help="the model that drafts, same tokenizer")] = "smollm2",
    num_speculative_tokens: Annotated[int, typer.Option(help="drafted tokens per step")] = SPECULATIVE_TOKENS[
        "draft"
    ],
    max_tokens: Annotated[int, typer.Option(help="new tokens per question")] = 128,
    questions: Annotated[int, typer.Option(help="chat questions, one at a time")] = 4,
    threads: Annotated[int | None, typer.Option(help="torch threads per system (default: torch's)")] = None,
    output: Annotated[Path | None, typer.Option(help=MARKDOWN_HELP)] = None,
) -> None:
    """Greedy decode at batch 1 with a draft model (speculative decoding), beside the target alone and
    the draft alone; the default pair is SmolLM2 as float32 drafted for by its own Q4_1 GGUF."""
    from llmasos.bench.common import report
    from llmasos.bench.draft import run_draft_bench

    rows, notes = run_draft_bench(target, draft_model, num_speculative_tokens, max_tokens, questions, threads)
    report(rows, target, notes, output)


@bench_app.command()
def kernels(
    model: Annotated[str, typer.Option(help="a model with GGUF blocks (GGUF or quantized copy)")] = "smollm2",
    rows: Annotated[
        list[int] | None,
        typer.Option(help="rows per matmul (batch, prompt chunk)", show_default="1, 16, 64"),
    ] = None,
    repeats: Annotated[int, typer.Option(help="timed runs; the best counts")] = 5,
) -> None:
    """The block matmuls of one model: integer kernel at 16 and 8 bits beside BLAS on float rows."""
    from llmasos.bench.kernels import ROW_COUNTS, print_kernel_table, run_kernel_bench

    print_kernel_table(run_kernel_bench(model, rows or ROW_COUNTS, repeats), model)


@bench_app.command()
def footprint(
    gguf: Annotated[Path | None, typer.Option(help="a .gguf file (default: the catalog's smollm2)")] = None,
    context: Annotated[int, typer.Option(help="KV-cache tokens for every system")] = 2048,
    output: Annotated[Path | None, typer.Option(help=MARKDOWN_HELP)] = None,
) -> None:
    """Store bytes, load seconds and peak RSS of a 64-token generation of one GGUF model, beside the
    layout GGUF imports of old stored and beside llama.cpp at the same context; one table."""
    from llmasos.bench.footprint import run_footprint_bench

    run_footprint_bench(gguf, context, output)


@bench_app.command()
def quality(
    model: Annotated[str, typer.Option(help="a Llama-family store or catalog model")] = "smollm2",
    data: Annotated[
        Path | None, typer.Option(help="held-out text", show_default="llmasos/bench/data/heldout.txt")
    ] = None,
    context: Annotated[int, typer.Option(help="window size in tokens")] = 512,
    stride: Annotated[int, typer.Option(help="how far each window moves")] = 256,
    to: Annotated[list[str], typer.Option(help="quantized copies to measure")] = ["int8", "int4"],  # noqa: B006
    activation_bits: Annotated[
        list[int], typer.Option(help="the block kernel's activation precisions to measure")
    ] = [16, 8],  # noqa: B006
    output: Annotated[Path | None, typer.Option(help="also write the rows as JSON")] = None,
) -> None:
    """Perplexity of float32, native-block, int8 and int4 runs of one model on a held-out text."""
    from llmasos.bench.quality import HELDOUT, report_quality, run_quality_bench

    data = data or HELDOUT
    rows = run_quality_bench(model, data, context, stride, to, activation_bits)
    report_quality(rows, model, data, context, stride, output)


@bench_app.command()
def train(
    device: Annotated[str, typer.Option(help="auto (CUDA when there is one), cuda or cpu")] = "auto",
    n_layers: Annotated[int, typer.Option(help="decoder layers")] = 12,
    d_model: Annotated[int, typer.Option(help="hidden size")] = 768,
    n_heads: Annotated[int, typer.Option(help="attention heads")] = 12,
    n_kv_heads: Annotated[int | None, typer.Option(help="key/value heads (default: n-heads)")] = None,
    d_ff: Annotated[int, typer.Option(help="MLP hidden size")] = 2048,
    vocab_size: Annotated[int, typer.Option(help="vocabulary size")] = 32000,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = 1024,
    batch_size: Annotated[int, typer.Option(help="sequences per step, the same for both systems")] = 32,
    steps: Annotated[int, typer.Option(help="timed optimizer steps")] = 50,
    warmup_steps: Annotated[int, typer.Option(help="untimed optimizer steps before them")] = 5,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 3e-4,
    peak_tflops: Annotated[
        float | None, typer.Option(help="the device's peak TFLOP/s for MFU (default: by GPU name)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the weights and the random tokens")] = 0,
    output: Annotated[Path | None, typer.Option(help=MARKDOWN_HELP)] = None,
) -> None:
    """Pretraining tokens/s and MFU of LLMasOS's Trainer beside transformers' Trainer; one table."""
    flags = dict(locals())  # the flags are TrainBenchConfig's fields, one for one (read before the import)
    from llmasos.bench.train import TrainBenchConfig, run_train_bench

    run_train_bench(TrainBenchConfig(**flags))


@bench_app.command()
def data(
    size: Annotated[
        list[str] | None, typer.Option(help="corpus sizes (KB, MB, GB), one run each", show_default="1GB")
    ] = None,
    steps: Annotated[str, typer.Option(help="the cleaning recipe's steps, comma-separated")] = ",".join(
        DATA_STEPS
    ),
    peer: Annotated[bool, typer.Option(help="also run the same steps bare in a datatrove pipeline")] = True,
    workdir: Annotated[
        Path | None, typer.Option(help="keep the corpora and stores here (default: a temporary folder)")
    ] = None,
    output: Annotated[Path | None, typer.Option(help=MARKDOWN_HELP)] = None,
    tasks: Annotated[int, typer.Option(min=1, help="worker processes of `data prepare` (--tasks)")] = 1,
) -> None:
    """A generated JSONL corpus (planted duplicates and PII) through `data import` and a cleaning
    recipe: MB/s and peak RSS of each step, beside the same steps bare in a datatrove pipeline."""
    from llmasos.bench.data import format_table, parse_size, run_data_bench

    sizes = [parse_size(s) for s in size or ["1GB"]]
    names = [s.strip() for s in steps.split(",") if s.strip()]
    format_table(run_data_bench(sizes, names, workdir, peer, tasks), names, output, tasks)
