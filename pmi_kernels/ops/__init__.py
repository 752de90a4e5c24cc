"""The custom ops and what they need: the layer between the public functions (logits.py,
fused_linear.py, diagnostics.py) and the backends' row functions.

    logits.py    pmi_kernels::pmi_kl_rows: pmi_kl's launcher, its fake and autograd
    fused.py     pmi_kernels::fused_pmi_kl_rows: fused_pmi_kl's launcher, its fake, and the
                 autograd.Function around it
    sweep.py     the fused path's chunk loop (GEMMs and the row operation per chunk)
    planner.py   rows per chunk from a workspace budget
    autograd.py  what both backward passes share
    schema.py    the loss options as the ops' named, typed arguments

The ops keep the data-dependent chunk loops and the kernels opaque to torch.compile.
"""
