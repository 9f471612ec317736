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
    picked = logits[:, :-1][mask].float()  # (N, V): only positions that predict a response token
    targets = labels[:, 1:][mask]
    token_logps = picked.gather(-1, targets[:, None]).squeeze(-1) - picked.logsumexp(-1)
    # Scatter back to (B, T-1) and sum per row: deterministic on CPU and CUDA alike.
    per_token = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    sums = per_token.masked_scatter(mask, token_logps).sum(-1)
    if average:
        counts = mask.sum(-1)
        if (counts == 0).any():
            raise ValueError("a row has no response tokens, so its average log-prob is undefined.")
        sums = sums / counts
    return sums
