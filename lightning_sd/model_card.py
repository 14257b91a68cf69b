"""A model card (README.md) beside the exported files: what it is, how it was trained, how to load."""

from __future__ import annotations

from pathlib import Path

from lightning_sd.atomic import write_atomic
from lightning_sd.families.base import ModelFamily

__all__ = ["write_model_card"]


def write_model_card(
    out_dir: str | Path,
    metadata: dict,
    files: dict[str, Path],
    trigger: str | None = None,
    tokens: list[str] | None = None,
    family: ModelFamily | None = None,
) -> Path:
    """Write ``README.md`` with Hugging Face model-card front matter and a loading snippet.

    Args:
        out_dir: the export folder.
        metadata: the training facts stored in the weight files' headers.
        files: format name -> written file.
        trigger: the prompt that names the subject (trigger words), if any.
        tokens: pivotal-tuning tokens that replace the abstraction in prompts, if any.
        family: the base's family (its text encoders, embedding and kohya layouts); default
            the one the metadata's pipeline names.
    """
    from lightning_sd.families import family_from_index

    family = family or family_from_index({"_class_name": metadata.get("pipeline", "")})
    base = metadata.get("base_model", "")
    encoder_rows = [
        f"| text-encoder{'' if n == 'text_encoder' else ' ' + n[-1]} adapter | "
        f"{'yes' if metadata.get(n + '_adapter') else 'no'} |"
        for n in family.embedding_keys
    ]
    adapter = metadata.get("adapter", {})
    objective = metadata.get("objective", {})
    parameterization = (objective.get("init_args", {}).get("parameterization", {}) or {}).get(
        "class_path", "Epsilon"
    )
    front = [
        "---",
        f"base_model: {base}",
        "library_name: diffusers",
        "license: other",
        "tags:",
        "- text-to-image",
        f"- {adapter.get('kind', 'lora')}",
        "- lightning_sd",
    ]
    if trigger:
        front.append(f"instance_prompt: {trigger}")
    front.append("---")
    lines = front + [
        "",
        f"# {adapter.get('kind', 'lora').upper()} adapter for {base}",
        "",
        "Trained with lightning_sd.",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| kind | {adapter.get('kind')} |",
        f"| rank / alpha | {adapter.get('rank')} / {adapter.get('alpha') or adapter.get('rank')} |",
        f"| targets | {adapter.get('targets')} |",
        f"| family | {family.name} |",
        *encoder_rows,
        f"| objective | {parameterization.rsplit('.', 1)[-1]} |",
        f"| steps | {metadata.get('steps')} |",
        "",
    ]
    if trigger:
        lines += ["## Trigger words", "", f"`{trigger}`", ""]
    if "diffusers" not in files and "kohya" in files:  # LoHa / LoKr: no diffusers LoRA loader
        lines += [
            "## Use",
            "",
            "diffusers' `load_lora_weights` reads no LoHa/LoKr file of this family; ComfyUI and "
            "A1111 read the LyCORIS file, and so does:",
            "",
            f'`lightning-sd generate {base} "{trigger or "a photo"}" '
            f"--loras {Path(out_dir).name}/{files['kohya'].name}`",
            "",
        ]
    lines += (
        []
        if "diffusers" not in files
        else [
            "## Use with diffusers",
            "",
            "```python",
            "from diffusers import AutoPipelineForText2Image",
            "from safetensors.torch import load_file",
            "",
            f'pipe = AutoPipelineForText2Image.from_pretrained("{base}")',
            f'pipe.load_lora_weights("{Path(out_dir).name}")',
        ]
    )
    if tokens and "embeddings" in files and "diffusers" in files:
        lines.append(f'state = load_file("{Path(out_dir).name}/{files["embeddings"].name}")')
        for name, key in family.embedding_keys.items():
            tokenizer = name.replace("text_encoder", "tokenizer")
            lines += [
                f"pipe.load_textual_inversion(state['{key}'], token={tokens!r},",
                f"                            text_encoder=pipe.{name}, tokenizer=pipe.{tokenizer})",
            ]
    prompt = trigger or "a photo"
    if tokens and trigger:
        prompt = trigger.replace(
            metadata.get("pivotal_tuning", {}).get("token_abstraction", ""), "".join(tokens)
        )
    if "diffusers" in files:
        lines += [f'image = pipe("{prompt}").images[0]', "```", ""]
    if "kohya" in files:
        lines += [
            "## A1111 / ComfyUI",
            "",
            f"`{files['kohya'].name}` is the same adapter in the kohya layout "
            f"({', '.join(f'`{p}*`' for p in family.kohya_prefixes.values())}, "
            "with the real alpha).",
            "",
        ]
    lines += ["## Files", ""] + [f"- `{p.name}` ({fmt})" for fmt, p in files.items()] + [""]
    return write_atomic(Path(out_dir) / "README.md", "\n".join(lines), "model card")
