"""LoRA bookkeeping on a denoiser: snapshots, folding LoRA into the base weights, merged exports — all in fp32.

Used by self-play round switches (DDO: the round's checkpoint becomes the new reference, i.e. its LoRA is folded
into the frozen base and re-initialised) and by exports of adapters without a Diffusers LoRA loader (Stable
Audio, AudioLDM2) or whose base was modified by such a fold.

Mixed precision (issue 13 §2): a realistic LoRA delta is far below the resolution of bf16/fp16 base weights
(bf16 keeps 8 significand bits: adding a delta 300× smaller than a weight changes nothing), so every fold here is
computed in fp32 from the fp32 delta and cast once:

- :func:`merge_lora_into_base` keeps a folded layer's base weights in **fp32** when they were half precision
  (their forward then runs on inputs cast to fp32 and returns the input dtype; see :func:`_keep_fp32`), so
  repeated rounds accumulate exactly and the reference equals the previous policy;
- :func:`merged_base_state` returns W + ΔW computed in fp32 (fp32 tensors; the consumer casts once, e.g. by
  loading into a fresh fp32 network).

Source: peft ``LoraLayer.get_delta_weight`` (ΔW = B·A·scaling, fan_in_fan_out and conv handled by peft),
peft ``reset_lora_parameters``; Diffusers ``save_pretrained`` / ``from_config``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from peft.tuners.lora import LoraLayer

__all__ = [
    "trainable_snapshot",
    "load_trainable_snapshot",
    "lora_layers",
    "lora_delta",
    "merge_lora_into_base",
    "merged_base_state",
    "write_merged_export",
]

_HALF = (torch.float16, torch.bfloat16)


def trainable_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies ``{name: tensor}`` of the parameters with ``requires_grad`` (LoRA weights, or the whole network).

    Dtypes are kept (LoRA weights are fp32 in genalign's adapters)."""
    return {n: p.detach().clone().cpu() for n, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_snapshot(module: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`trainable_snapshot` back into the module's trainable parameters in place (optimizer
    references stay valid).

    Raises:
        KeyError: a trainable parameter of ``module`` is missing from ``snap`` (names it).
    """
    for n, p in module.named_parameters():
        if p.requires_grad:
            if n not in snap:
                raise KeyError(f"LoRA snapshot has no tensor for trainable parameter {n!r}")
            p.copy_(snap[n].to(p.device, p.dtype))


def lora_layers(module: torch.nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """``(qualified name, layer)`` of every peft LoRA layer inside ``module``."""
    for name, mod in module.named_modules():
        if isinstance(mod, LoraLayer):
            yield name, mod


def lora_delta(layer: LoraLayer) -> torch.Tensor:
    """ΔW of one LoRA layer in **fp32**, summed over its adapters (shape of the base weight).

    peft's ``get_delta_weight`` returns B·A·scaling in the LoRA weights' dtype (fp32 in genalign's adapters; on
    CPU peft also upcasts half LoRA weights for the product); the result is upcast here before any addition.
    """
    total: Optional[torch.Tensor] = None
    for name in list(layer.lora_A.keys()):
        d = layer.get_delta_weight(name).to(torch.float32)
        total = d if total is None else total + d
    if total is None:
        raise ValueError("LoRA layer has no adapter")
    return total


def _cast_inputs(module: torch.nn.Module, args: tuple) -> tuple:
    module._genalign_in_dtype = next((a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()), None)
    return tuple(a.to(module.weight.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _cast_output(module: torch.nn.Module, args: tuple, out: Any) -> Any:
    dt = getattr(module, "_genalign_in_dtype", None)
    return out.to(dt) if dt is not None and torch.is_tensor(out) and out.is_floating_point() else out


def _keep_fp32(base: torch.nn.Module) -> None:
    """Upcast a half-precision base layer to fp32 (once) so a fold is stored exactly; its forward casts inputs to
    fp32 and the output back to the input dtype, so the rest of the bf16/fp16 network is unaffected."""
    if base.weight.dtype not in _HALF:
        return
    base.float()
    if not getattr(base, "_genalign_fp32_hooks", False):
        base.register_forward_pre_hook(_cast_inputs)
        base.register_forward_hook(_cast_output)
        base._genalign_fp32_hooks = True


@torch.no_grad()
def merge_lora_into_base(module: torch.nn.Module, lora_state: Optional[dict[str, torch.Tensor]] = None,
                         reset: bool = True, init: Any = "gaussian") -> int:
    """Fold the LoRA deltas into the frozen base weights, W ← W + ΔW, computed in fp32.

    Afterwards the LoRA-disabled network (the ``adapter_off`` reference) *is* the policy that carried this LoRA.
    Half-precision base layers that receive a fold are kept in fp32 (:func:`_keep_fp32`): a bf16 weight cannot
    hold a typical delta (issue 13 §2: 72 % of delta elements were lost by an in-place bf16 add).

    Args:
        module: the denoiser (unwrapped, with peft LoRA layers).
        lora_state: optional :func:`trainable_snapshot` loaded into the LoRA before folding (resume: re-applying a
            recorded round); the LoRA values present before the call are restored afterwards unless ``reset``.
        reset: re-initialise the LoRA after folding (B = 0, peft ``reset_lora_parameters``), so the policy starts
            equal to its new reference.
        init: peft ``init_lora_weights`` value for the reset ("gaussian" or True).

    Returns:
        The number of LoRA layers folded (0: the module has no LoRA; nothing changed).
    """
    current = None if reset else trainable_snapshot(module)
    if lora_state is not None:
        load_trainable_snapshot(module, lora_state)
    count = 0
    for _, layer in lora_layers(module):
        base = layer.get_base_layer()
        delta = lora_delta(layer)
        _keep_fp32(base)
        base.weight.data = base.weight.data.to(torch.float32) + delta.to(base.weight.device)
        if reset:
            for name in list(layer.lora_A.keys()):
                layer.reset_lora_parameters(name, init)
        count += 1
    if current is not None:
        load_trainable_snapshot(module, current)
    return count


@torch.no_grad()
def merged_base_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's weights with the current LoRA folded in, under plain (peft-free) parameter names, on CPU.

    ``x.base_layer.weight`` + ΔW → ``x.weight`` computed in fp32 (the folded tensors are fp32; other tensors keep
    their dtype); LoRA tensors are dropped. Load the result into a fresh network (``type(net).from_config``) to
    get a LoRA-free copy: that load is the single cast.
    """
    deltas = {f"{name}.base_layer.weight": lora_delta(layer) for name, layer in lora_layers(module)}
    out = {}
    for k, v in module.state_dict().items():
        if "lora_" in k:
            continue
        if k in deltas:
            w = v.detach().to(torch.float32) + deltas[k].to(v.device)
        else:
            w = v.detach().clone()
        out[k.replace(".base_layer.", ".")] = w.cpu()
    return out


def write_merged_export(pipe, denoiser: torch.nn.Module, attr: str, out_dir: str | Path) -> None:
    """Save ``pipe`` as a Diffusers folder whose ``attr`` network (``unet`` / ``transformer``) is ``denoiser`` with
    every LoRA (and any earlier fold) merged in, as a fresh fp32 network without peft layers.

    No LoRA file is written here: after folds the model is no longer "base + one LoRA". The other components are
    saved as they are in ``pipe``.

    Args:
        pipe: the Diffusers pipeline (not modified: a shallow copy gets the merged network).
        denoiser: the trained network, unwrapped (never the DDP wrapper).
        attr: the pipeline attribute holding the denoiser.
        out_dir: destination folder.
    """
    fresh = type(denoiser).from_config(denoiser.config)
    fresh.load_state_dict(merged_base_state(denoiser))
    out = copy.copy(pipe)
    setattr(out, attr, fresh)
    out.save_pretrained(str(out_dir))
