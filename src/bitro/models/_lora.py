"""LoRA adapters for transfer between levels (paper §3.5), through ``peft``.

:func:`apply_lora` injects LoRA into named ``nn.Linear`` layers of a :class:`~bitro.models.BiTroNet`
in place (``peft.inject_adapter_in_model``), so the network keeps its class and its
``forward(x, batch, edge_index, pos, ...)`` signature. Each adapted layer computes
``W x + (alpha / rank) · B A x`` with ``A``: ``(rank, in)``, ``B``: ``(out, rank)``; ``B`` starts at zero,
so a fresh adapter leaves the outputs unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

#: Default LoRA targets: input / GAT / position projections, attention q/v/out and the FFN layers.
DEFAULT_TARGETS: tuple[str, ...] = ("input_proj", "proj", "q_proj", "v_proj", "out_proj", "fc1", "fc2")
#: Prefix of the task-specific gene head (queries + readout).
HEAD_PREFIX = "head."


def apply_lora(
    net: nn.Module,
    *,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] | None = None,
    train_head: bool = True,
) -> nn.Module:
    """Freeze ``net`` and add trainable LoRA adapters to its projection, attention and FFN layers.

    Parameters
    ----------
    net
        A :class:`~bitro.models.BiTroNet` (modified in place and returned).
    rank
        LoRA rank ``r``.
    alpha
        LoRA scaling ``alpha`` (the update is scaled by ``alpha / rank``).
    dropout
        Dropout on the LoRA branch input.
    target_modules
        Names (suffixes after a ``.``) of the ``nn.Linear`` layers to adapt; default
        :data:`DEFAULT_TARGETS`: ``gat.input_proj``, ``gat.layers.*.proj``, ``position.proj``, the attention
        ``q_proj``/``v_proj``/``out_proj`` and the FFN ``fc1``/``fc2``.
    train_head
        Keep the gene head (queries and readout, ``head.*``) trainable; it is task-specific.

    Returns
    -------
    ``net`` itself, with only the LoRA weights (and the head when ``train_head``) requiring grad.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        msg = f"rank must be an integer ≥ 1, got {rank!r}."
        raise ValueError(msg)
    if not 0 <= dropout < 1:
        msg = f"dropout must lie in [0, 1), got {dropout!r}."
        raise ValueError(msg)
    if any("lora_" in name for name, _ in net.named_parameters()):
        msg = "net already has LoRA adapters; apply_lora once per network."
        raise ValueError(msg)
    targets = list(DEFAULT_TARGETS if target_modules is None else target_modules)
    present = {name.rsplit(".", 1)[-1] for name, mod in net.named_modules() if isinstance(mod, nn.Linear)}
    missing = sorted(set(targets) - present)
    if missing and target_modules is not None:
        msg = (
            f"target_modules {missing} match no nn.Linear layer of the network; available: {sorted(present)}."
        )
        raise ValueError(msg)
    targets = [t for t in targets if t in present]
    if not targets:
        msg = "No nn.Linear layer of the network matches the LoRA targets."
        raise ValueError(msg)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    net = inject_adapter_in_model(config, net)
    for name, param in net.named_parameters():
        param.requires_grad = "lora_" in name or (train_head and name.startswith(HEAD_PREFIX))
    return net


def lora_trainable_summary(net: nn.Module) -> dict[str, int]:
    """Count parameters: ``trainable`` (requires grad), ``frozen`` and ``lora`` (adapter weights)."""
    out = {"trainable": 0, "frozen": 0, "lora": 0}
    for name, param in net.named_parameters():
        out["trainable" if param.requires_grad else "frozen"] += param.numel()
        if "lora_" in name:
            out["lora"] += param.numel()
    return out
