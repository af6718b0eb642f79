"""The `endpoint` backend: agents behind an OpenAI-compatible chat-completions server (a hosted API, vLLM, SGLang,
llama.cpp, `transformers serve`), evaluated in the same Ray Data job as the local agents.

The conversation goes as chat messages: the harness's system note and choice question included, rendered by the
server's own chat template. The behavior is read from the first generated token's `top_logprobs` when the server
returns them (`readout: logprobs`), else from the text (`readout: text`: a leading behavior token or option
letter, else the answer rule); each prediction row records which.

What a paid API needs:
- each request is tried up to `1 + max_retries` times on 408, 409, 429, 5xx, a timeout or a dropped connection,
  after `Retry-After` (up to `max_retry_wait_s`) or an exponential backoff (0.5 s doubling to 8 s, jittered);
- one `Ledger` actor per agent keeps the agent's request rate and budget over all its actors, and counts what
  was spent;
- responses are cached beside the agent's predictions (`PredictionStore.responses`), one line each as it
  arrives, so a killed or re-run job never sends a request twice;
- the API key is read on the worker from the environment variable `api_key_env` names; no message, record or
  file holds it (`scrub`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time
import uuid
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from typing import Any

from harness.agents.prompts import choice_question, conversation
from harness.agents.selection import Strategy, framing, read_answer, read_choice
from harness.core.storage import Location
from harness.data.taxonomy import Taxonomy, load_taxonomy
from harness.evaluate.config import EndpointSettings, EvalConfig
from harness.evaluate.grading import needs_answer
from harness.evaluate.runs import ResolvedAgent
from harness.results.predictions import Prediction, prediction_batch, scores_column

RETRIED = frozenset({408, 409, 429})  # and every 5xx
CHOICE_TOKENS = 4  # enough for "A", "(A)" or "A." and a little more, to read a letter strictly
BACKOFF_S, BACKOFF_MAX_S = 0.5, 8.0
BUDGET = "budget spent"  # the error of the rows an agent did not send because its budget ran out
# What a ledger counts: requests sent (retries included), answered, retried, tasks given up, answers taken from
# the cache, and the tokens the server reported.
USAGE = ("requests", "answered", "retries", "failed", "cached", "prompt_tokens", "completion_tokens")


class EndpointError(Exception):
    """What went wrong with an agent's endpoint, in one line, with no key and no request text in it."""


class Ledger:
    """Ray actor, one per endpoint agent and job: the agent's request rate and budget over all its actors, and
    what it spent. Its methods run one at a time, so the counts need no lock."""

    def __init__(self, requests_per_s: float | None, max_requests: int | None, max_tokens: int | None):
        self.interval = 1 / requests_per_s if requests_per_s else 0.0
        self.max_requests, self.max_tokens = max_requests, max_tokens
        self.next_slot = 0.0
        self.spent = dict.fromkeys(USAGE, 0)

    def admit(self) -> float | None:
        """When (wall-clock seconds) the caller may send its next request, or None when the budget is spent. An
        absolute time: the reply's own latency does not shift the request (nodes' clocks agree to NTP's skew)."""
        tokens = self.spent["prompt_tokens"] + self.spent["completion_tokens"]
        if (self.max_requests and self.spent["requests"] >= self.max_requests) or (
            self.max_tokens and tokens >= self.max_tokens
        ):
            return None
        self.spent["requests"] += 1
        slot = max(time.time(), self.next_slot)
        self.next_slot = slot + self.interval
        return slot

    def record(self, counts: dict[str, int]) -> None:
        for key, value in counts.items():
            self.spent[key] += value

    def usage(self) -> dict[str, float]:
        """What was spent, with the share of requests that got no answer (`error_rate`)."""
        sent = self.spent["requests"]
        return {**self.spent, "error_rate": (sent - self.spent["answered"]) / sent if sent else 0.0}


def scrub(text: str, secret: str | None) -> str:
    """`text` with the key replaced, should a server or a library ever echo it."""
    return text.replace(secret, "***") if secret else text


def request_key(base_url: str, body: dict[str, Any]) -> str:
    """What identifies a response: the endpoint, and the request's body (model, messages, seed, sampling)."""
    return hashlib.sha256(json.dumps([base_url, body], sort_keys=True).encode()).hexdigest()


class ResponseCache:
    """The responses an agent run received, one JSON line each, in files under `location`: each actor appends to a
    file of its own and flushes every line (in an object store, where nothing appends, a new object per batch)."""

    def __init__(self, location: Location):
        self.location = location
        self.responses: dict[str, dict[str, Any]] = {}
        for shard in location.files("*.jsonl"):
            for line in shard.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:  # the line a killed actor was writing
                    continue
                self.responses[entry["key"]] = entry["response"]
        self.shard = location.child(f"responses-{uuid.uuid4().hex}.jsonl")
        self.pending: list[str] = []
        self.handle = None

    def get(self, key: str) -> dict[str, Any] | None:
        return self.responses.get(key)

    def add(self, key: str, response: dict[str, Any]) -> None:
        self.responses[key] = response
        line = json.dumps({"key": key, "response": response}) + "\n"
        if self.location.local:
            if self.handle is None:
                os.makedirs(self.location.path, exist_ok=True)
                self.handle = open(self.shard.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the actor's life)
            self.handle.write(line)
            self.handle.flush()
        else:
            self.pending.append(line)

    def flush(self) -> None:
        """Upload what an object store has not seen yet, as one new object."""
        if self.pending:
            self.location.child(f"responses-{uuid.uuid4().hex}.jsonl").write_text("".join(self.pending))
            self.pending.clear()


@dataclass(frozen=True)
class Reading:
    behavior: str
    label: str
    scores: dict[str, float | None] | None
    readout: str


class Reader:
    """How one agent's behavior is read from a completion, by strategy and readout."""

    def __init__(self, agent: ResolvedAgent, taxonomy: Taxonomy):
        spec, settings = agent.spec, agent.spec.endpoint
        self.strategy, self.design, self.taxonomy, self.readout = (
            spec.strategy,
            agent.design,
            taxonomy,
            settings.readout,
        )
        self.letters = choice_question(taxonomy)[1]
        if self.strategy is Strategy.BEHAVIOR_TOKEN:
            self.spellings = self.design.tokens(taxonomy)  # label -> its token, e.g. <behavior:proactive>
        elif self.strategy is Strategy.CHOICE:
            self.spellings = dict(self.letters)  # behavior -> its option letter
        else:
            self.spellings = {}

    def _behavior(self, label: str) -> str:
        if self.strategy is Strategy.BEHAVIOR_TOKEN:
            return self.taxonomy.behavior_of_label(self.design.granularity, label)
        return label

    def read(self, completion: dict[str, Any]) -> tuple[Reading, str]:
        """The reading of one completion and its text; EndpointError when the completion cannot be read."""
        choices = completion.get("choices") if isinstance(completion, dict) else None
        if not choices:
            raise EndpointError("answered with no choices")
        choice = choices[0] or {}
        text = ((choice.get("message") or {}).get("content")) or ""
        first = (((choice.get("logprobs") or {}).get("content")) or [{}])[0] or {}
        alternatives = first.get("top_logprobs") or []
        if self.spellings and self.readout != "text":
            if alternatives:
                best: dict[str, float] = {}
                for alternative in alternatives:
                    token, value = str(alternative.get("token", "")).strip(), alternative.get("logprob")
                    if isinstance(value, (int, float)):
                        best[token] = max(best.get(token, float("-inf")), float(value))
                scores = {label: best.get(spelling) for label, spelling in self.spellings.items()}
                present = {label: value for label, value in scores.items() if value is not None}
                if present:
                    label = max(present, key=lambda name: present[name])
                    return Reading(self._behavior(label), label, scores, "logprobs"), text
                if self.readout == "logprobs":
                    raise EndpointError(
                        f"none of {sorted(self.spellings.values())} is among the {len(alternatives)} top_logprobs of "
                        "the first token; set endpoint.readout: text (or auto)"
                    )
            elif self.readout == "logprobs":
                raise EndpointError("returned no logprobs (it ignores them); set endpoint.readout: text (or auto)")
        if self.strategy is Strategy.CHOICE:
            chosen = read_choice(text, self.letters)
            if chosen is not None:
                return Reading(chosen, chosen, None, "text"), text
            behavior, label = read_answer(text, None, self.taxonomy)
            return Reading(behavior, "", None, "text"), text
        behavior, label = read_answer(text, self.design, self.taxonomy)
        return Reading(behavior, label, None, "text"), text


def chat_messages(
    agent: ResolvedAgent, messages: list[dict[str, Any]], taxonomy: Taxonomy, answering: bool = False
) -> list[dict[str, str]]:
    """The conversation as it is sent: the agent's system note and choice question included, as `agent_prompt`
    renders them for a local model (`answering`: without the question, for an answer whose content is graded)."""
    note, question = framing(agent.spec.mode, agent.spec.strategy, agent.design, taxonomy)
    asked = [{"role": "user", "content": question}] if question and not answering else []
    return conversation([*messages, *asked], note)


def request_body(
    agent: ResolvedAgent, messages: list[dict[str, str]], max_new_tokens: int, answering: bool = False
) -> dict[str, Any]:
    """A chat-completions request: the choice's few tokens with the readout's log-probabilities, or an answer."""
    settings: EndpointSettings = agent.spec.endpoint
    choosing = agent.spec.strategy is Strategy.CHOICE and not answering
    body: dict[str, Any] = {
        "model": agent.spec.model,
        "messages": messages,
        "max_tokens": CHOICE_TOKENS if choosing else max_new_tokens,
        "temperature": 0.0,
        "seed": settings.seed,
    }
    if settings.readout != "text" and agent.spec.strategy is not Strategy.GENERATE and not answering:
        body.update(logprobs=True, top_logprobs=settings.top_logprobs)
    return {**body, **settings.extra_body}


def _retry_after(headers: Any, cap: float) -> float | None:
    """Seconds a `Retry-After` (or `retry-after-ms`) header asks for; None without one or above `cap`."""
    if headers is None:
        return None
    try:
        if headers.get("retry-after-ms"):
            wait = float(headers["retry-after-ms"]) / 1000
        elif headers.get("retry-after"):
            value = headers["retry-after"]
            try:
                wait = float(value)
            except ValueError:
                wait = parsedate_to_datetime(value).timestamp() - time.time()
        else:
            return None
    except (TypeError, ValueError):
        return None
    return max(wait, 0.0) if wait <= cap else None


def backoff(attempt: int) -> float:
    """Exponential backoff with jitter: 0.5 s doubling to 8 s, each wait drawn between half and all of it."""
    return min(BACKOFF_MAX_S, BACKOFF_S * 2**attempt) * random.uniform(0.5, 1.0)


class EndpointClient:
    """One endpoint agent's requests from one actor: its key, its event loop's client, retries paced and counted by
    the agent's ledger, and the response cache. A failure that retrying cannot mend stops it (`stopped`)."""

    def __init__(self, settings: EndpointSettings, ledger: Any, responses: Location):
        self.settings, self.ledger = settings, ledger
        self.where = f"endpoint {settings.base_url}"
        name = settings.api_key_env
        self.secret = os.environ.get(name) if name else None
        self.stopped = ""
        if name and not self.secret:
            self.stopped = f"EndpointError: ${name} is not set on this node (the key is read from its environment)"
        self.cache = ResponseCache(responses)
        self.loop = asyncio.new_event_loop()
        self.client: Any = None

    def run(self, work: Any) -> Any:
        """Run a coroutine on this client's event loop; then upload what an object store has not seen."""
        result = self.loop.run_until_complete(work)
        self.cache.flush()
        return result

    def failed(self, exc: EndpointError) -> str:
        """The one line of a failure (scrubbed of the key); any but a spent budget stops this client."""
        message = scrub(str(exc), self.secret)
        if message == BUDGET:
            return message
        if not self.stopped:
            self.stopped = f"EndpointError: {self.where}: {message}"
            self.count(failed=1)
        return self.stopped

    async def complete(self, body: dict[str, Any], check: Any = None) -> dict[str, Any]:
        """The completion of `body`: from the cache, else from the server (kept once `check` accepts it)."""
        key = request_key(self.settings.base_url, body)
        completion = self.cache.get(key)
        if completion is not None:
            self.count(cached=1)
            return completion
        completion = await self._send(body)
        if check is not None:
            check(completion)  # a completion that cannot be read is not kept
        self.cache.add(key, completion)
        return completion

    def count(self, **spent: int) -> None:
        """Tell the ledger what was spent, as it is spent: its token budget sees each response."""
        self.ledger.record.remote(spent)

    def _client(self) -> Any:
        from openai import AsyncOpenAI

        if self.client is None:  # made inside the actor's event loop, which its connections belong to
            self.client = AsyncOpenAI(
                base_url=self.settings.base_url,
                api_key=self.secret or "unused",
                timeout=self.settings.timeout_s,
                max_retries=0,  # retried here, where each try is counted and paced by the ledger
            )
        return self.client

    async def _send(self, body: dict[str, Any]) -> dict[str, Any]:
        """One completion, tried up to `1 + max_retries` times; EndpointError when it cannot be had."""
        import openai

        settings, tries = self.settings, self.settings.max_retries + 1
        for attempt in range(tries):
            slot = await self.ledger.admit.remote()
            if slot is None:
                raise EndpointError(BUDGET)
            await asyncio.sleep(max(0.0, slot - time.time()))
            try:
                text = await self._client().post("/chat/completions", body=body, cast_to=str)
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status not in RETRIED and status < 500:
                    raise EndpointError(_status_problem(exc, settings)) from None
                delay = _retry_after(exc.response.headers, settings.max_retry_wait_s)
                if delay is None and exc.response.headers.get("retry-after"):
                    raise EndpointError(
                        f"answered {status} asking to retry after {exc.response.headers['retry-after']} s, more than "
                        f"max_retry_wait_s ({settings.max_retry_wait_s:g} s)"
                    ) from None
                problem = f"answered {status} {tries} times"
            except openai.APITimeoutError:
                delay, problem = None, f"did not answer within {settings.timeout_s:g} s, {tries} times"
            except openai.APIConnectionError as exc:
                delay, problem = None, f"unreachable ({_cause(exc)}), {tries} times"
            else:
                try:
                    response = json.loads(text)
                except ValueError:
                    raise EndpointError("answered with a body that is not JSON") from None
                if not isinstance(response, dict):
                    raise EndpointError("answered with a body that is not a JSON object")
                usage = response.get("usage") or {}
                self.count(
                    answered=1,
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0),
                )
                return response
            if attempt + 1 < tries:
                self.count(retries=1)
                await asyncio.sleep(backoff(attempt) if delay is None else delay)
        raise EndpointError(problem)


def completion_text(completion: dict[str, Any]) -> str:
    """The first choice's message text ("" without one)."""
    choices = completion.get("choices") or [{}]
    return ((choices[0] or {}).get("message") or {}).get("content") or ""


class EndpointPredictor:
    """Ray Data callable class: one endpoint agent's predictions for each batch of tasks it has none for yet, with
    `concurrency` requests in flight. A failure that retrying cannot mend (a wrong key, an unknown model, a
    malformed answer) stops the agent: its remaining rows carry the one-line error, as the `hf` backend's do."""

    def __init__(self, agent: ResolvedAgent, cfg: EvalConfig, done: set[str], ledger: Any, responses: Location):
        self.agent, self.cfg, self.done = agent, cfg, done
        self.taxonomy = load_taxonomy(cfg.taxonomy)
        self.reader = Reader(agent, self.taxonomy)
        self.client = EndpointClient(agent.spec.endpoint, ledger, responses)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        index = [i for i, task in enumerate(batch["task_id"]) if task not in self.done]
        rows = {key: [column[i] for i in index] for key, column in batch.items()}
        predictions = self.client.run(self._predict_all(rows))
        return prediction_batch(rows, self.agent.spec.name, predictions)

    async def _predict_all(self, rows: dict[str, list]) -> list[Prediction]:
        gate = asyncio.Semaphore(self.agent.spec.endpoint.concurrency)

        async def one(messages: list[dict[str, Any]], kind: str) -> Prediction:
            async with gate:
                prediction = await self._predict(messages)
                if self.cfg.content and needs_answer(kind, prediction):
                    prediction = await self._answer(messages, prediction)
                return prediction

        tasks = zip(rows["messages"], rows["task_type"], strict=True)
        return list(await asyncio.gather(*(one(list(messages), kind) for messages, kind in tasks)))

    async def _predict(self, messages: list[dict[str, Any]]) -> Prediction:
        strategy = self.agent.spec.strategy.value
        sent = chat_messages(self.agent, messages, self.taxonomy)
        prediction = Prediction(strategy, prompt=json.dumps(sent, ensure_ascii=False), chat_template_sha256="")
        if self.client.stopped:
            return replace(prediction, error=self.client.stopped)
        began = time.perf_counter()
        try:
            completion = await self.client.complete(
                request_body(self.agent, sent, self.cfg.max_new_tokens), check=self.reader.read
            )
            reading, text = self.reader.read(completion)
        except EndpointError as exc:
            return replace(prediction, error=self.client.failed(exc))
        usage = completion.get("usage") or {}
        return replace(
            prediction,
            prompt_tokens=usage.get("prompt_tokens"),
            pred_behavior=reading.behavior,
            pred_label=reading.label,
            scores=scores_column(list(reading.scores), list(reading.scores.values())) if reading.scores else None,
            answer=text,
            latency_ms=(time.perf_counter() - began) * 1000,
            readout=reading.readout,
        )

    async def _answer(self, messages: list[dict[str, Any]], prediction: Prediction) -> Prediction:
        """`prediction` with an answer whose content can be graded (a `choice` agent's 4 tokens are a letter)."""
        sent = chat_messages(self.agent, messages, self.taxonomy, answering=True)
        try:
            body = request_body(self.agent, sent, self.cfg.max_new_tokens, answering=True)
            completion = await self.client.complete(body)
        except EndpointError as exc:
            return replace(prediction, error=self.client.failed(exc))
        return replace(prediction, answer=completion_text(completion))


def _cause(exc: BaseException) -> str:
    """Why a connection failed, from the innermost error that says (`Connection refused`), not the client's
    generic `Connection error.`."""
    reason, seen = "", set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return os.strerror(exc.errno)
        reason = (str(exc).strip().splitlines() or [reason])[0]
        exc = exc.__cause__ or exc.__context__
    return reason[:200] or "no reason given"


def _status_problem(exc: Any, settings: EndpointSettings) -> str:
    """One line for an answer retrying cannot mend: its status and what the server said (its first 200 characters)."""
    status = exc.status_code
    said = ""
    try:
        body = exc.response.json()
        error = body.get("error", body) if isinstance(body, dict) else body
        said = error.get("message") if isinstance(error, dict) else str(error)
    except ValueError:
        said = exc.response.text
    said = " ".join(str(said or "").split())[:200]
    hint = ""
    if status in (401, 403):
        hint = f" (a wrong or missing key in ${settings.api_key_env})" if settings.api_key_env else " (no key is sent)"
    elif status == 404:
        hint = " (an unknown model or a wrong base_url?)"
    return f"answered {status}{hint}: {said or 'no message'}"
