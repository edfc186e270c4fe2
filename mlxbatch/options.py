"""Click options shared by commands: the input and generation settings (`process`,
`validate`), the result store (`status`, `export`).

Declarations only, with the callbacks that check a value as it is parsed (`--ray`,
`--deadline`); turning options into a JobSpec is cli.py's `_spec`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from mlxbatch.jobs.spec import DEFAULT_MODEL


def input_options(f: Callable) -> Callable:
    options = [
        click.argument("input", required=False, type=click.Path(dir_okay=True)),
        click.option(
            "--job",
            "job_file",
            type=click.Path(),
            help="Job file (YAML or JSON) holding any of these options; flags override it.",
        ),
        click.option(
            "--template",
            help="Jinja template rendered over each row's fields, e.g. 'Review: {{ text }}'.",
        ),
        click.option("--system", help="System prompt added to chat prompts."),
        click.option(
            "--input-format",
            type=click.Choice(["auto", "prompt", "messages", "openai", "rows"]),
            default="auto",
            show_default=True,
            help="Row kind; 'auto' detects it from the file.",
        ),
        click.option(
            "--input-schema",
            type=click.Path(),
            help="JSON schema every input row must also satisfy.",
        ),
        click.option(
            "--id-field",
            help="Row field holding each row's id (default: custom_id, id, else the line number).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _check_ray_address(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    import importlib.util

    from mlxbatch.jobs.ray_connect import INSTALL_HINT, valid_address

    if not valid_address(value):
        raise click.BadParameter(
            f"{value!r} is not a Ray address (auto, local, HOST:PORT or ray://HOST:PORT); "
            "give INPUT before --ray, or write --ray=ADDRESS",
            ctx,
            param,
        )
    if importlib.util.find_spec("ray") is None:
        raise click.BadParameter(f"Ray is not installed: {INSTALL_HINT}", ctx, param)
    return value


def _check_deadline(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    from mlxbatch.jobs.deadline import parse_hhmm

    if value is not None:
        try:
            parse_hhmm(value)
        except ValueError as e:
            raise click.BadParameter(str(e), ctx, param) from None
    return value


def generation_options(f: Callable) -> Callable:
    options = [
        click.option(
            "-o",
            "--output",
            type=click.Path(),
            help="Output file, .jsonl or .parquet  [default: <input>.out.jsonl]",
        ),
        click.option(
            "--store", type=click.Path(), help="Result store  [default: <output>.mlxbatch.sqlite]"
        ),
        click.option(
            "-m",
            "--model",
            default=DEFAULT_MODEL,
            show_default=True,
            help="Local model directory or Hugging Face repo id.",
        ),
        click.option("--adapter-path", type=click.Path(), help="LoRA adapter directory."),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
            default="auto",
            show_default=True,
            help="Weights dtype; auto = float32 on CPU, the model's own on GPU.",
        ),
        click.option(
            "--quantize",
            type=click.Choice([4, 8]),
            help="Quantize an unquantized model to 4 or 8 bits in memory at load.",
        ),
        click.option(
            "--trust-remote-code",
            is_flag=True,
            help="Allow the tokenizer to run code from the model repo.",
        ),
        click.option(
            "--chat-template/--no-chat-template",
            default=True,
            show_default=True,
            help="Apply the model's chat template to --template rows.",
        ),
        click.option(
            "--max-tokens",
            type=click.IntRange(min=1),
            default=256,
            show_default=True,
            help="Most tokens to generate per row.",
        ),
        click.option(
            "--temperature",
            type=click.FloatRange(0, 10),
            default=0.0,
            show_default=True,
            help="Sampling temperature; 0 is greedy.",
        ),
        click.option(
            "--top-p",
            type=click.FloatRange(0, 1, min_open=True),
            default=1.0,
            show_default=True,
            help="Nucleus sampling mass.",
        ),
        click.option(
            "--seed",
            type=int,
            default=0,
            show_default=True,
            help="Job seed; a row's draws depend only on it, the row id and sample index.",
        ),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option(
            "-n",
            "--n",
            "n",
            type=click.IntRange(1, 1024),
            default=1,
            show_default=True,
            help="Samples per row.",
        ),
        click.option(
            "--top-k",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Sample among the k most likely tokens; 0 = all.",
        ),
        click.option(
            "--min-p",
            type=click.FloatRange(0, 1),
            default=0.0,
            show_default=True,
            help="Drop tokens less likely than min-p times the most likely one.",
        ),
        click.option(
            "--repetition-penalty",
            type=click.FloatRange(min=0, min_open=True),
            default=1.0,
            show_default=True,
            help="Penalty on tokens already in the last 20 generated; 1 = none.",
        ),
        click.option("--logprobs", is_flag=True, help="Record each generated token's logprob."),
        click.option(
            "--top-logprobs",
            type=click.IntRange(0, 20),
            default=0,
            show_default=True,
            help="Also record the N most likely tokens at each step.",
        ),
        click.option(
            "--json-schema",
            type=click.Path(),
            help="JSON schema file every output must match (constrained decoding).",
        ),
        click.option(
            "--choices", help="Comma-separated labels; each row gets one, with probabilities."
        ),
        click.option("--regex", help="Regular expression every output must match."),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            help="Most rows decoded together  [default: chosen from memory]",
        ),
        click.option(
            "--prefill-batch-size",
            type=click.IntRange(min=1),
            help="Most prompts prefilled together  [default: chosen from prompt lengths]",
        ),
        click.option(
            "--prefix-cache/--no-prefix-cache",
            default=True,
            show_default=True,
            help="Prefill a prompt prefix shared by many rows once and reuse its KV cache.",
        ),
        click.option(
            "--window",
            type=click.IntRange(min=1),
            default=10_000,
            show_default=True,
            help="Rows read and length-sorted at a time.",
        ),
        click.option(
            "--checkpoint-every",
            type=click.FloatRange(min=0),
            default=300.0,
            show_default=True,
            help="Seconds between re-exports of the output during a run.",
        ),
        click.option(
            "--fresh", is_flag=True, help="Ignore stored results (a damaged store is moved aside)."
        ),
        click.option(
            "--max-errors",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Failed rows tolerated before the exit code is 1.",
        ),
        click.option(
            "--ray",
            is_flag=False,
            flag_value="auto",
            default=None,
            metavar="[ADDRESS]",
            callback=_check_ray_address,
            help="Generate on a Ray cluster (pip install 'mlxbatch[ray]'): alone, the cluster "
            "running here, else a new local one; or ADDRESS (HOST:PORT). Put it after INPUT.",
        ),
        click.option(
            "--ray-workers",
            type=click.IntRange(min=1),
            help="Ray workers, each holding the model  [default: one per mlx unit, GPU or node]",
        ),
        click.option(
            "--ignore-model",
            is_flag=True,
            help="Run OpenAI batch lines whose body.model names another model "
            "(default: each is a model_mismatch error record).",
        ),
        click.option(
            "--deadline",
            metavar="HH:MM",
            callback=_check_deadline,
            help="Stop cleanly at this local time (its next occurrence), exit 3; run again "
            "to resume.",
        ),
        click.option(
            "--dry-run",
            is_flag=True,
            help="Check, tokenize and count, time a short calibration, estimate the run "
            "time (and whether it meets --deadline); write nothing.",
        ),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


store_option = click.option(
    "--store", type=click.Path(), help="Result store  [default: <output>.mlxbatch.sqlite]"
)
