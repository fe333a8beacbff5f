"""Reference DELLA (being written; see docs/CONTRACT_ISSUE3.md)."""


def della_l1_norms(base, tensors, densities, epsilons, seed):
    raise NotImplementedError("reference della_l1_norms is being written")


def della_merge(base, tensors, densities, epsilons, seed, inverse, scales, weights, sign_source, consensus, divisor,
                normalize, lambda_, out_dtype):
    raise NotImplementedError("reference della_merge is being written")
