"""`llmasos bench guards`: what the guards cost, per request and to a server's throughput.

Latency: every guard alone and all of them in one pipeline (the policy redacting everything
they find, so redaction is timed too), on generated texts that read like what a server sees:
support requests and assistant answers of a few hundred to a few thousand characters, half of
them carrying PII and secrets (e-mails, phone numbers, cards, IBANs, SSNs, IPs, addresses, API
keys, passwords, each valid by its checksum or library), half none. Input is one `check_input`
per prompt; streamed output is the answer cut into token-sized deltas (up to 4 characters and
their leading space) fed to a `StreamGuard`, timed per answer and per delta: a delta's time is
how long the server's event loop is held by it. Each measurement builds its guards afresh, so no
cache holds lines from an earlier one; one untimed text warms each up.

Throughput: workload G3 (bench/serve.py: its prompts, client and figures) against `llmasos serve
MODEL` started twice in subprocesses, first without a guard policy, then with one (the given
file, or one that redacts every category); the ratio of output throughputs is the guards' cost
(1.0: none). G3's prompts are random common words, so this is the cost on PII-free traffic: the
guards scan everything and find nothing. The guarded server's audit log is read afterwards: it
must hold two verdicts (input, output) per request, or the policy was not on.

Labelled (`--labelled`): the secrets guard's precision and recall on its labelled set
(bench/secrets_labelled.py), per format, per provider and per kind of negative; no model, no timing.

The detectors, validators and the load client are imported where they are used, so that this
command costs the rest of the CLI nothing at start-up.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import string
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmasos.bench.common import Row, free_port, report, server_process

if TYPE_CHECKING:
    from llmasos.bench.secrets_labelled import LabelledScore, Tally
    from llmasos.bench.serve import ServeBenchResult, Summary
    from llmasos.safety import Guard, GuardPipeline, Policy

ALL_GUARDS = "all guards"
STAGES = ("input", "streamed output")
DEFAULT_POLICY = "default: {default_action: redact}\n"

# The words of the texts: no digits, so that a text without PII has nothing to find.
PROMPT_SENTENCES = (
    "Hi, I ordered a standing desk last week and it still has not shipped.",
    "Could you summarize the attached meeting notes in five bullet points?",
    "Our deployment fails with a timeout when the database migration runs.",
    "Please rewrite this paragraph so that it sounds friendlier to customers.",
    "I think I was charged twice for the same subscription this month.",
    "What is the difference between a process and a thread in an operating system?",
    "The report is due on Friday and the figures in the second table do not add up.",
    "Can you translate the following note into French and keep the tone formal?",
    "My account was locked after I reset my password from the mobile app.",
    "Explain how a paged key-value cache lets a server batch many requests at once.",
    "We would like to move our team plan to the annual billing cycle.",
    "The parcel arrived damaged and the box was open on one side.",
)
ANSWER_SENTENCES = (
    "Thanks for reaching out, and sorry for the trouble with your order.",
    "I have checked your account and can see what happened.",
    "Here is a short summary of the main points discussed in the meeting.",
    "The migration times out because the lock on the large table is held too long.",
    "A process has its own memory, while threads of one process share it.",
    "I have issued a refund for the duplicate charge; it takes a few days to appear.",
    "To unlock the account, follow the link in the message we just sent you.",
    "The second table counts returns twice, which explains the difference.",
    "Let me know if there is anything else I can help you with today.",
    "A paged cache stores keys and values in fixed-size blocks that requests share.",
    "Your plan now renews once a year, and the change applies from the next cycle.",
    "We will send a replacement at no cost and arrange a pickup of the damaged one.",
)
PII_SENTENCES = (
    "You can reach me at {email} or call {phone}.",
    "The card on file is {card}, expiring in September.",
    "Please wire the refund to {iban}.",
    "For the tax form, my SSN is {ssn}.",
    "The server at {ip} keeps rejecting the connection.",
    "Ship the replacement to {street}, Springfield.",
    "Here is the token we use in production: {api_key}",
    'The config file says password = "{password}" for the admin user.',
)
FIRST = ("john", "maria", "wei", "fatima", "lucas", "emma", "noah", "aisha", "oliver", "sofia")
LAST = ("smith", "garcia", "chen", "khan", "muller", "rossi", "novak", "okafor", "silva", "brown")
DOMAINS = ("example.com", "mail.example.org", "corp.example.net", "gmail.com")
STREETS = ("Maple", "Oak", "Pennsylvania", "Baker", "Sunset", "Elm", "Harbor", "Mission")
SUFFIXES = ("Street", "Avenue", "Road", "Boulevard", "Lane", "Drive")
AREA_CODES = ("212", "415", "617", "650", "312", "206", "303", "512")


@dataclass
class GuardLatency:
    """One guard (or all of them) on one stage and kind of text: seconds per request, and for a
    streamed output also per delta."""

    stage: str  # "input" or "streamed output"
    pii: bool
    system: str  # a guard's name, or ALL_GUARDS
    per_request: Summary
    per_delta: Summary | None
    mean_chars: float


@dataclass
class GuardBenchResult:
    model: str
    latencies: list[GuardLatency]
    unguarded: ServeBenchResult | None = None
    guarded: ServeBenchResult | None = None
    audited_verdicts: int = 0  # guard records in the guarded server's audit log

    @property
    def throughput_ratio(self) -> float:
        """Output throughput with guards over without (1.0: the guards cost nothing)."""
        if self.unguarded is None or self.guarded is None:
            return math.nan
        return self.guarded.output_throughput / self.unguarded.output_throughput


# ---- the texts -------------------------------------------------------------------------------


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(string.digits, k=n))


def _valid(make: Callable[[], str], valid: Callable[[str], bool]) -> str:
    while not valid(value := make()):
        pass
    return value


def _phone(rng: random.Random) -> str:
    import phonenumbers

    def make() -> str:
        return f"({rng.choice(AREA_CODES)}) {rng.randint(200, 999)}-{_digits(rng, 4)}"

    return _valid(make, lambda v: phonenumbers.is_valid_number(phonenumbers.parse(v, "US")))


def _card(rng: random.Random) -> str:
    from stdnum import luhn

    body = "4" + _digits(rng, 14)
    number = body + luhn.calc_check_digit(body)
    return " ".join(number[i : i + 4] for i in range(0, 16, 4))


def _iban(rng: random.Random) -> str:
    from stdnum import iban

    bban = "".join(rng.choices(string.ascii_uppercase, k=4)) + _digits(rng, 14)
    return iban.format(f"GB{iban.calc_check_digits('GB00' + bban)}{bban}")


def pii_values(rng: random.Random) -> dict[str, str]:
    """One made-up person's data, every value valid as its guard checks it."""
    from stdnum.us import ssn

    first, last = rng.choice(FIRST), rng.choice(LAST)
    return {
        "email": f"{first}.{last}{rng.randint(1, 99)}@{rng.choice(DOMAINS)}",
        "phone": _phone(rng),
        "card": _card(rng),
        "iban": _iban(rng),
        "ssn": _valid(
            lambda: f"{rng.randint(100, 665)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}",
            ssn.is_valid,
        ),
        "ip": ".".join(map(str, [rng.choice((10, 172, 192, 203)), *rng.choices(range(1, 255), k=3)])),
        "street": f"{rng.randint(10, 9999)} {rng.choice(STREETS)} {rng.choice(SUFFIXES)}",
        "api_key": "ghp_" + "".join(rng.choices(string.ascii_letters + string.digits, k=36)),
        "password": "".join(rng.choices(string.ascii_letters + string.digits, k=14)),
    }


def make_texts(count: int, pii: bool, answers: bool, seed: int = 0) -> list[str]:
    """`count` prompts (answers=False) or answers, of 3 to 30 sentences in 1 to 4 paragraphs;
    with pii, 1 to 3 sentences carrying PII or secrets among them."""
    rng = random.Random(f"{seed}-{pii}-{answers}")
    pool = ANSWER_SENTENCES if answers else PROMPT_SENTENCES
    texts = []
    for _ in range(count):
        sentences = rng.choices(pool, k=rng.randint(3, 30))
        if pii:
            values = pii_values(rng)
            for template in rng.sample(PII_SENTENCES, rng.randint(1, 3)):
                sentences.insert(rng.randint(0, len(sentences)), template.format(**values))
        cuts = sorted(rng.sample(range(1, len(sentences)), min(rng.randint(0, 3), len(sentences) - 1)))
        bounds = [0, *cuts, len(sentences)]
        texts.append("\n\n".join(" ".join(sentences[a:b]) for a, b in zip(bounds, bounds[1:])))
    return texts


def deltas(text: str) -> list[str]:
    """The text cut as a tokenizer would about cut it: up to 4 characters and their leading space."""
    return re.findall(r"\s*\S{1,4}|\s+", text)


# ---- latency ---------------------------------------------------------------------------------


def _time_input(pipeline: GuardPipeline, texts: Sequence[str]) -> list[float]:
    times = []
    for text in texts:
        start = time.perf_counter()
        pipeline.check_input(text)
        times.append(time.perf_counter() - start)
    return times


def _time_stream(pipeline: GuardPipeline, texts: Sequence[str]) -> tuple[list[float], list[float]]:
    from llmasos.safety import StreamGuard

    per_text, per_delta = [], []
    for text in texts:
        stream = StreamGuard(pipeline)
        total = 0.0
        for piece in deltas(text):
            start = time.perf_counter()
            stream.feed(piece)
            took = time.perf_counter() - start
            per_delta.append(took)
            total += took
        start = time.perf_counter()
        stream.finish()
        per_text.append(total + time.perf_counter() - start)
    return per_text, per_delta


def measure_latency(
    num_texts: int,
    policy: Policy | None = None,
    make_guards: Callable[[], list[Guard]] | None = None,
    seed: int = 0,
) -> list[GuardLatency]:
    """Per stage, with and without PII, each guard alone and all together (see the module doc);
    make_guards builds the guards afresh (default: safety.default_guards)."""
    from llmasos.bench.serve import Summary
    from llmasos.safety import GuardPipeline, Policy, default_guards

    policy = policy or Policy()
    make_guards = make_guards or default_guards
    names = [guard.name for guard in make_guards()]
    results = []
    for stage in STAGES:
        for pii in (True, False):
            warmup, *texts = make_texts(num_texts + 1, pii, answers=stage != "input", seed=seed)
            for system in [*names, ALL_GUARDS]:
                guards = [g for g in make_guards() if system in (ALL_GUARDS, g.name)]  # fresh caches
                pipeline = GuardPipeline(guards, policy)
                if stage == "input":
                    _time_input(pipeline, [warmup])
                    per_text, per_delta = _time_input(pipeline, texts), None
                else:
                    _time_stream(pipeline, [warmup])
                    per_text, per_delta = _time_stream(pipeline, texts)
                results.append(
                    GuardLatency(
                        stage,
                        pii,
                        system,
                        Summary.of(per_text),
                        None if per_delta is None else Summary.of(per_delta),
                        sum(map(len, texts)) / max(len(texts), 1),
                    )
                )
    return results


# ---- throughput ------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(model: str, workdir: Path, policy: Path | None, serve_flags: Sequence[str]) -> Iterator[str]:
    """`llmasos serve MODEL` in a subprocess, with no keys and its audit log in workdir; its URL once
    /ready, then SIGTERM."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "llmasos", "serve", model, "--port", str(port)]
    command += ["--keys-file", str(workdir / "keys.json"), "--audit-file", str(workdir / "audit.jsonl")]
    command += [*serve_flags, *(["--guard-policy", str(policy)] if policy else [])]
    with server_process(command, f"{url}/ready", workdir / "server.log"):
        yield url


def measure_throughput(
    model: str,
    policy: Path | None,
    num_requests: int,
    max_concurrency: int,
    prompt_len: int,
    output_len: int,
    serve_flags: Sequence[str] = (),
) -> tuple[ServeBenchResult, ServeBenchResult, int]:
    """G3 without guards, then with the policy (None: redact every category); and the number of
    guard verdicts the guarded server audited."""
    from llmasos.bench.serve import run_serve_bench

    flags = ["--max-num-seqs", str(max_concurrency), *serve_flags]
    with tempfile.TemporaryDirectory(prefix="llmasos-bench-guards-") as tmp:
        plain, guarded = Path(tmp, "plain"), Path(tmp, "guarded")
        plain.mkdir(), guarded.mkdir()
        if policy is None:
            policy = Path(tmp, "policy.yaml")
            policy.write_text(DEFAULT_POLICY)
        results = []
        for workdir, guard_policy in ((plain, None), (guarded, policy)):
            with serving(model, workdir, guard_policy, flags) as url:
                results.append(
                    run_serve_bench(
                        url, model, num_requests, math.inf, max_concurrency, prompt_len, output_len
                    )
                )
        lines = (guarded / "audit.jsonl").read_text().splitlines()
        verdicts = sum(json.loads(line).get("event") == "guard" for line in lines if line.strip())
    return results[0], results[1], verdicts


# ---- the table -------------------------------------------------------------------------------


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs"


def format_table(result: GuardBenchResult, output: Path | None = None) -> list[Row]:
    """Print the run's one table (and write it as Markdown to `output` if given)."""
    rows = []
    for lat in result.latencies:
        note = f"p99 {_us(lat.per_request.p99)}, {lat.per_request.count} texts of {lat.mean_chars:.0f} chars"
        if lat.per_delta is not None:
            note += f"; per delta p50 {_us(lat.per_delta.p50)}, p99 {_us(lat.per_delta.p99)}"
        workload = f"guards p50, {lat.stage}, {'with' if lat.pii else 'no'} PII"
        rows.append(Row(workload, lat.system, lat.per_request.p50 * 1e6, "µs", note))
    notes = ["latency: per request (a prompt, or a whole streamed answer); per delta: one StreamGuard.feed"]
    for label, run in (("no guards", result.unguarded), ("guard policy", result.guarded)):
        if run is None:
            continue
        server = f"LLMasOS server, {label}"
        done = f"{run.completed} done, {run.failed} failed in {run.duration:.1f} s"
        ratio = result.throughput_ratio if run is result.guarded else None
        if ratio is not None:
            done += f"; speed-up = with guards / without, {result.audited_verdicts} verdicts audited"
        rows.append(Row("G3 output throughput", server, run.output_throughput, "tok/s", done, ratio))
        rows.append(
            Row("G3 TTFT p50", server, run.ttft.p50 * 1000, "ms", f"p99 {run.ttft.p99 * 1000:.1f} ms")
        )
        notes += [f"failed ({label}): {error}" for error in run.errors]
    if result.unguarded is not None:
        run = result.unguarded
        notes.append(
            f"G3: {run.num_requests} requests of {run.prompt_len} words -> {run.output_len} tokens, "
            f"all at once, max concurrency {run.max_concurrency}"
        )
    report(rows, result.model, notes, output)
    return rows


def run_guard_bench(
    model: str = "smollm2",
    texts: int = 200,
    throughput: bool = True,
    guard_policy: Path | None = None,
    num_requests: int = 64,
    max_concurrency: int = 16,
    prompt_len: int = 128,
    output_len: int = 64,
    kv_cache_gib: float | None = None,
) -> GuardBenchResult:
    """The latencies on `texts` texts per stage and kind, under the policy file's default policy
    (None: the built-in Policy()); and, with `throughput`, G3 against servers without / with it."""
    from llmasos.safety import PolicySet

    policy = PolicySet.load(guard_policy).default if guard_policy else None
    result = GuardBenchResult(model, measure_latency(texts, policy))
    if throughput:
        flags = ["--kv-cache-gib", str(kv_cache_gib)] if kv_cache_gib else []
        result.unguarded, result.guarded, result.audited_verdicts = measure_throughput(
            model, guard_policy, num_requests, max_concurrency, prompt_len, output_len, flags
        )
    return result


# ---- the labelled set ------------------------------------------------------------------------


def measure_labelled(seed: int = 0) -> LabelledScore:
    """The secrets guard on the labelled set drawn with `seed`."""
    from llmasos.bench.secrets_labelled import labelled_cases, score
    from llmasos.safety import secrets_guard

    guard = secrets_guard()
    return score(lambda text: [(f.start, f.end) for f in guard.check(text)], labelled_cases(seed=seed))


def _counts(tally: Tally) -> str:
    missed = tally.positives - tally.found
    return f"{tally.positives} positives, {tally.negatives} negatives: {missed} missed, {tally.flagged} false"


def format_labelled_table(result: LabelledScore, output: Path | None = None) -> list[Row]:
    """Print precision and recall per format, recall per provider and false positives per kind of
    negative (and write them as Markdown to `output` if given); the misses are listed below."""
    rows = []
    for name, tally in [*sorted(result.formats.items()), ("all formats", result.total)]:
        rows.append(Row(f"secrets, {name}", "precision", tally.precision * 100, "%", _counts(tally)))
        rows.append(Row(f"secrets, {name}", "recall", tally.recall * 100, "%"))
    for provider, tally in sorted(result.providers.items(), key=lambda item: item[0].lower()):
        note = f"{tally.found} of {tally.positives} found, {tally.flagged} stray"
        rows.append(Row(f"secrets, provider {provider}", "recall", tally.recall * 100, "%", note))
    for kind, tally in sorted(result.negative_kinds.items()):
        note = f"{tally.flagged} of {tally.negatives} flagged"
        rows.append(
            Row(
                f"secrets, negatives: {kind}",
                "false positives",
                tally.flagged / tally.negatives * 100,
                "%",
                note,
            )
        )
    notes = [
        "labelled set: llmasos/bench/data/secrets_labelled.yaml, drawn with seed 0; a positive counts when "
        "every expected secret is covered by findings, a negative is false when anything is found in it",
        *result.failures,
    ]
    report(rows, "secrets guard, labelled set", notes, output)
    return rows
