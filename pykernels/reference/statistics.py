"""Reference element-wise statistics across N tensors (being written; see docs/CONTRACT_ISSUE3.md)."""


def trimmed_mean(base, tensors, trim, out_dtype):
    raise NotImplementedError("reference trimmed_mean is being written")


def sign_count(base, tensors):
    raise NotImplementedError("reference sign_count is being written")
