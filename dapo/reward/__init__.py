"""Rule-based answer verification (``verify``: DAPO-compatible, boxed, Math-Verify) and the
answer normalisation it uses (``normalize``)."""
