"""Turn Requests into keyed Tasks: sandboxed row templates, the model's chat template, token ids.

Row templates run in Jinja's ImmutableSandboxedEnvironment with StrictUndefined: no access to
Python internals, no file or network access, and a missing field is an error, not an empty
string. Chat templates come only from the model's own tokenizer. Each Task gets a content key
(see `task_key`) so the store can tell what is already done. No model is run here.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlxbatch.pipeline.encode import encode_texts
from mlxbatch.pipeline.keys import KeyHasher
from mlxbatch.records import TEMPLATE, Request, Task


class TemplateError(ValueError):
    """A row template that does not compile or does not render."""


MAX_REPEAT = 100_000  # longest string or list a template may build with `*`
MAX_EXPONENT = 64


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus limits on `*` and `**` so a template cannot exhaust memory."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is larger than {MAX_EXPONENT}")
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                sized = isinstance(seq, (str, list, tuple)) and isinstance(count, int)
                if sized and len(seq) * count > MAX_REPEAT:
                    raise SecurityError(f"result longer than {MAX_REPEAT}")
        return super().call_binop(context, operator, left, right)


@cache
def _environment() -> ImmutableSandboxedEnvironment:
    return _BoundedSandbox(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True
    )


@cache
def compile_template(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(
            f"template syntax error: {e.message} (template line {e.lineno})"
        ) from None


def template_fields(source: str) -> frozenset[str]:
    """The row fields a template reads (its undeclared top-level names)."""
    try:
        ast = _environment().parse(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(
            f"template syntax error: {e.message} (template line {e.lineno})"
        ) from None
    return frozenset(jinja2.meta.find_undeclared_variables(ast))


def render_text(source: str, fields: dict[str, Any]) -> str:
    """Render a row template; sandbox violations and undefined names become TemplateError."""
    try:
        return compile_template(source).render(**fields)
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"template blocked by the sandbox: {e}") from None
    except jinja2.UndefinedError as e:
        raise TemplateError(f"template error: {e.message}") from None
    except jinja2.TemplateError as e:
        raise TemplateError(f"template error: {e}") from None
    except (TypeError, ValueError, ArithmeticError, MemoryError) as e:
        raise TemplateError(f"template error: {e}") from None


def _chat_text(tokenizer: Any, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system is None or any(m["role"] in ("system", "developer") for m in messages):
        return messages
    return [{"role": "system", "content": system}, *messages]


def prompt_text(
    request: Request,
    tokenizer: Any,
    *,
    template: str | None,
    system: str | None,
    use_chat_template: bool = True,
) -> tuple[str, bool]:
    """The prompt as text, and whether the tokenizer should add its special tokens.

    Chat-templated text already holds the special tokens, so it is encoded without them.
    """
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    messages = request.messages
    if request.kind == TEMPLATE:
        assert template is not None
        text = render_text(template, request.fields or {})
        if not (use_chat_template and has_chat):
            return (f"{system}\n\n{text}" if system else text), True
        messages = [{"role": "user", "content": text}]
    if messages is not None:
        if not has_chat:
            raise TemplateError("the model has no chat template; give 'prompt' rows instead")
        return _chat_text(tokenizer, with_system(messages, system)), False
    if request.prompt is not None:
        return request.prompt, True
    if request.prompt_ids is not None:
        return tokenizer.decode(request.prompt_ids), False
    raise TemplateError("row has nothing to generate from")


def _token_error(ids: list[int], tokenizer: Any) -> tuple[str, str] | None:
    """An error for a prompt given as token ids that the model's vocabulary does not hold."""
    size = len(tokenizer)
    bad = next((t for t in ids if not 0 <= t < size), None)
    if bad is None:
        return None
    return ("invalid_prompt", f"token id {bad} is outside the vocabulary (0 to {size - 1})")


def prompt_token_ids(request: Request, tokenizer: Any, **options: Any) -> list[int]:
    """The prompt's token ids, exactly as the model will see them."""
    text, special = prompt_text(request, tokenizer, **options)
    return encode_texts(tokenizer, [text], special)[0]


def render_identity(
    tokenizer: Any,
    *,
    model_identity: str,
    template: str | None,
    system: str | None,
    use_chat_template: bool,
) -> bytes:
    """Everything besides the request itself that its tasks' keys depend on."""
    chat = str(getattr(tokenizer, "chat_template", None))
    settings = json.dumps([model_identity, template, system, use_chat_template, chat])
    return hashlib.sha256(
        settings.encode("utf-8", "surrogatepass") + _tokenizer_digest(tokenizer)
    ).digest()


# The files a tokenizer is made from: what mlx-lm's load_tokenizer fetches besides weights.
TOKENIZER_FILES = ("*.json", "*.py", "*.model", "*.tiktoken", "*.txt", "*.jsonl", "*.jinja")


def _tokenizer_digest(tokenizer: Any) -> bytes:
    """A digest of the files the tokenizer was loaded from or, loaded from elsewhere, of its
    serialization. (With a 126k-token vocabulary, serializing took 61 ms, hashing 4 MB of
    files a few.)"""
    source = str(getattr(tokenizer, "name_or_path", "") or "")
    if source and Path(source).is_dir():
        files = sorted({p for pattern in TOKENIZER_FILES for p in Path(source).glob(pattern)})
        digest = hashlib.sha256()
        for path in files:
            digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
        return digest.digest()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab()))
    return hashlib.sha256(vocabulary.encode("utf-8", "surrogatepass")).digest()


def request_digest(request: Request, identity: bytes) -> bytes:
    """A digest of what a request's task keys are computed from, under `render_identity`.

    Equal digests mean equal keys, so a run can find a row's keys without rendering it again.
    (Pickle is fast; equal requests that pickle differently only miss the cache.)
    """
    content = pickle.dumps(
        (request.kind, request.prompt, request.messages, request.prompt_ids, request.fields,
         vars(request.params)),
        protocol=5,
    )  # fmt: skip
    return hashlib.blake2b(content, digest_size=16, key=identity).digest()


def render_tasks(
    requests: Iterable[Request],
    tokenizer: Any,
    *,
    model_identity: str,
    template: str | None,
    system: str | None,
    use_chat_template: bool,
    seqs: list[int] | None = None,
    known_keys: dict[int, list[str]] | None = None,
    digests: list[bytes | None] | None = None,
) -> list[Task]:
    """One Task per request and sample, numbered in output order from 0, or from each
    request's own first number in `seqs` (a resumed run's rows keep theirs).

    `known_keys` maps a request's index to its tasks' keys, found earlier and already done:
    such a request is not rendered again, and its tasks carry no prompt ids. `digests`, the
    requests' digests, are passed on to their tasks.
    """
    requests = list(requests)
    known = known_keys or {}
    errors: list[tuple[str, str] | None] = [r.error for r in requests]
    texts: dict[bool, list[tuple[int, str]]] = {True: [], False: []}
    for i, request in enumerate(requests):
        if i in known:
            continue
        if errors[i] is None and request.prompt_ids is not None:
            errors[i] = _token_error(request.prompt_ids, tokenizer)
        elif errors[i] is None:
            try:
                text, special = prompt_text(
                    request,
                    tokenizer,
                    template=template,
                    system=system,
                    use_chat_template=use_chat_template,
                )
                texts[special].append((i, text))
            except (TemplateError, jinja2.TemplateError, ValueError) as e:
                errors[i] = ("render_error", str(e))
    ids: list[list[int]] = [list(r.prompt_ids or []) for r in requests]
    for special, items in texts.items():
        if items:
            encoded = encode_texts(tokenizer, [t for _, t in items], special)
            for (i, _), token_ids in zip(items, encoded, strict=True):
                ids[i] = token_ids
    rendered = [ids[i] for i, e in enumerate(errors) if e is None and i not in known]
    keys = KeyHasher(model_identity, rendered)
    tasks: list[Task] = []
    seq = 0
    for i, (request, error, prompt_ids) in enumerate(zip(requests, errors, ids, strict=True)):
        done = known.get(i)
        if seqs is not None:
            seq = seqs[i]
        for sample in range(request.params.n):
            key = done[sample] if done is not None else keys.key(prompt_ids, request.params, sample)
            if error is not None:
                # Failed rows still need distinct keys; their error is not cached as a result.
                key = hashlib.sha256(f"{key}:{request.line}:{error}".encode()).hexdigest()
            tasks.append(
                Task(
                    key=key,
                    seq=seq,
                    line=request.line,
                    id=request.id,
                    sample_index=sample,
                    prompt_ids=prompt_ids,
                    params=request.params,
                    custom_id=request.custom_id,
                    url=request.url,
                    error=error,
                    done=done is not None,
                    digest=digests[i] if digests else None,
                )
            )
            seq += 1
    return tasks
