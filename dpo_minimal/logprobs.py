"""Per-sequence log-probabilities of the response tokens."""

import torch


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    average: bool = False,
) -> torch.Tensor:
    """log pi(y | x) = sum_t log pi(y_t | x, y_<t) over the response tokens of each row.

    Args:
        logits: (B, T, V) model outputs; position t predicts token t + 1.
        labels: (B, T) input token ids.
        loss_mask: (B, T) 1 where the token is a response token (trained), 0 for prompt/padding.
        average: divide by the number of response tokens (the length-normalised variant;
            the paper and TRL sum, which is the default).

    Returns:
        (B,) float32 log-probabilities.

    Only the response positions are sent through log-softmax, in float32, so the cost and memory
    follow the number of response tokens rather than B * T * V, and the value of a row does not
    depend on padding or on the other rows of the batch.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or loss_mask.shape != labels.shape:
        raise ValueError(
            f"expected logits (B, T, V) with labels and loss_mask (B, T); got "
            f"{tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(loss_mask.shape)}."
        )
    mask = loss_mask[:, 1:].bool()
    picked = logits[:, :-1][mask]  # (N, V): only positions that predict a response token
    return response_logps(picked, labels[:, 1:][mask], mask, average=average)


def response_logps(
    picked_logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    average: bool = False,
) -> torch.Tensor:
    """`sequence_logps` from the logits at the response positions only.

    Args:
        picked_logits: (N, V) logits of the N positions where `mask` is 1, in row-major order,
            i.e. `logits[:, :-1][mask]`; a caller can apply the LM head to those positions alone.
        targets: (N,) the tokens they predict, `labels[:, 1:][mask]`.
        mask: (B, T-1) bool, the shifted loss mask `loss_mask[:, 1:]`.
        average: divide each row's sum by its number of response tokens.

    Returns:
        (B,) float32 log-probabilities, equal to `sequence_logps` on the full logits.
    """
    picked = picked_logits.float()
    token_logps = picked.gather(-1, targets[:, None]).squeeze(-1) - picked.logsumexp(-1)
    # Scatter back to (B, T-1) and sum per row: deterministic on CPU and CUDA alike.
    per_token = torch.zeros(mask.shape, dtype=torch.float32, device=picked.device)
    sums = per_token.masked_scatter(mask, token_logps).sum(-1)
    if average:
        counts = mask.sum(-1)
        if (counts == 0).any():
            raise ValueError("a row has no response tokens, so its average log-prob is undefined.")
        sums = sums / counts
    return sums
