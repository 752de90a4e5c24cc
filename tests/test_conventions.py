"""The conventions of TRL, Liger and verl: 0/1 integer masks, labels with ignore_index, a
normalizer (num_items_in_batch), per-position statistics from the same sweep, loss modules;
and the API's behaviour under autograd edge cases. Last, the code's own layering: the
integrations import no trainer code, and the trainer's modules use no other module's
underscore names."""

import ast
import pathlib
from typing import Iterator, Optional, Set, Tuple

import pytest
import torch

from conftest import PATHS
from helpers import assert_close, streams, upcast
from pmi_kernels import FusedPMIKLLoss, PMIKLLoss, fused_pmi_kl, pmi_diagnostics, pmi_kl
from pmi_kernels.reference import fused_pmi_kl_reference, linear_logits, pmi_kl_reference, pmi_target_logits

LABELS = torch.tensor([[5, -100, 7], [-100, 9, 2]])


def hidden_inputs(device, n=6, h=8, v=61):
    x = [torch.randn(n, h, dtype=torch.float64).float().to(device) for _ in range(3)]
    w = (torch.randn(v, h, dtype=torch.float64) * 0.7).float().to(device)
    return [t.reshape(2, 3, h) for t in x], w


def call(fn_name, device, backend, **kwargs):
    """(loss, gradient of the student stream) of pmi_kl or fused_pmi_kl on fixed inputs."""
    torch.manual_seed(0)
    if fn_name == "pmi_kl":
        s, t, r = (x.reshape(2, 3, 61) for x in streams(6, 61, torch.float32, device, count=3))
        s.requires_grad_(True)
        out = pmi_kl(s, t, r, backend=backend, **kwargs)
    else:
        (s, t, r), w = hidden_inputs(device)
        s.requires_grad_(True)
        out = fused_pmi_kl(s, w, t, r, backend=backend, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(loss.sum(), s)
    return out, grad


@pytest.mark.parametrize("fn_name", ["pmi_kl", "fused_pmi_kl"])
@pytest.mark.parametrize("device,backend", PATHS)
def test_labels_and_integer_masks_equal_the_bool_mask(device, backend, fn_name):
    labels = LABELS.to(device)
    want = call(fn_name, device, backend, mask=labels != -100)
    for kwargs in (
        dict(labels=labels),
        dict(mask=(labels != -100).long()),
        dict(mask=(labels != -100).to(torch.uint8)),
        dict(labels=torch.where(labels == -100, 0, labels + 1), ignore_index=0),
    ):
        got = call(fn_name, device, backend, **kwargs)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), kwargs


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fn_name", ["pmi_kl", "fused_pmi_kl"])
@pytest.mark.parametrize("device,backend", PATHS)
def test_normalizer_divides_the_masked_sum(device, backend, fn_name, reduction):
    """With a normalizer both reductions give (masked sum) / normalizer, and so do the gradients."""
    labels = LABELS.to(device)
    total, total_grad = call(fn_name, device, backend, labels=labels, reduction="sum")
    for normalizer in (7, 2.5, torch.tensor(7.0, device=device), torch.tensor(4, device=device)):
        loss, grad = call(fn_name, device, backend, labels=labels, reduction=reduction, normalizer=normalizer)
        value = float(normalizer)
        assert torch.allclose(loss, total / value, rtol=1e-6) and torch.allclose(grad, total_grad / value, rtol=1e-5)


@pytest.mark.parametrize(
    "normalizer", [0, -1.0, float("nan"), float("inf"), True, "7", torch.ones(2), torch.tensor(0.0), torch.tensor(True)]
)
def test_bad_normalizer_is_a_value_error(normalizer):
    s, t = streams(3, 10, count=2)
    with pytest.raises(ValueError, match="^normalizer"):
        pmi_kl(s, t, normalizer=normalizer)
    with pytest.raises(ValueError, match="^normalizer"):
        pmi_kl(s, t, normalizer=4, reduction="none")


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(mask=torch.tensor([1, 2, 0])), "mask"),
        (dict(mask=torch.tensor([1.0, 0.0, 1.0])), "mask"),
        (dict(mask=torch.tensor([1, 0, 1]), labels=torch.tensor([1, 2, 3])), "mask and labels"),
        (dict(labels=torch.tensor([1.0, 2.0, 3.0])), "labels"),
        (dict(labels=torch.tensor([True, False, True])), "labels"),
        (dict(labels=torch.tensor([1, 2])), "labels"),
        (dict(labels=torch.tensor([1, 2, 3]), ignore_index=None), "ignore_index"),
        (dict(check_finite="no"), "check_finite"),
        (dict(return_stats=1), "return_stats"),
        (dict(workspace_bytes="abc"), "workspace_bytes"),
        (dict(workspace_bytes=0), "workspace_bytes"),
        (dict(ignore_index="a"), "ignore_index"),
        (dict(normalizer=torch.tensor(2.0, device="meta")), "normalizer"),
        (dict(beta=10**400), "beta"),
        (dict(beta=1e-40), "beta"),
        (dict(temperature=1e-38), "temperature"),
        (dict(clip=1e300), "clip"),
        (dict(entry_clip=1e39), "entry_clip"),
    ],
)
def test_bad_conventions_are_value_errors(kwargs, name):
    s, t, r = streams(3, 10, count=3)
    with pytest.raises(ValueError, match=f"^{name}"):
        pmi_kl(s, t, r, **kwargs)
    h = [torch.randn(3, 4) for _ in range(3)]
    with pytest.raises(ValueError, match=f"^{name}"):
        fused_pmi_kl(h[0], torch.randn(10, 4), h[1], h[2], **kwargs)


def test_numpy_normalizers_are_numbers():
    import numpy as np

    s, t, r = streams(3, 10, count=3)
    want = pmi_kl(s, t, r, normalizer=4.0)
    for normalizer in (np.float32(4.0), np.float64(4.0), np.int64(4)):
        assert torch.allclose(pmi_kl(s, t, r, normalizer=normalizer), want)


def test_diagnostics_flags_are_bools():
    s, t, r = streams(3, 10, count=3)
    with pytest.raises(ValueError, match="^check_finite"):
        pmi_diagnostics(s, t, r, check_finite=0)


def reference_stats(s, t, r, a=None, **options):
    """KL(q || p), H(p), H(q) per position from the reference's target, in float64."""
    temperature = options.get("temperature", 1.0)

    def scaled(x):
        return None if x is None else upcast(x) / temperature

    from pmi_kernels.options import LossOptions

    opts = LossOptions(pmi=r is not None, **options)
    lp = scaled(s).log_softmax(-1)
    lq = pmi_target_logits(scaled(s), scaled(t), scaled(r), scaled(a), opts).log_softmax(-1)
    p, q = lp.exp(), lq.exp()
    return {
        "kl_target_student": (q * (lq - lp)).sum(-1),
        "entropy_student": -(p * lp).sum(-1),
        "entropy_target": -(q * lq).sum(-1),
    }


@pytest.mark.parametrize(
    "options",
    [
        dict(jsd_beta=0.0),
        dict(jsd_beta=1.0, temperature=0.7),
        dict(jsd_beta=0.4, entry_clip=1e-3, clip=2.0, center=False),
    ],
    ids=["forward-kl", "reverse-kl", "mixed-entry-clip"],
)
@pytest.mark.parametrize("mode", ["pmi", "opsd"])
@pytest.mark.parametrize("device,backend", PATHS)
def test_return_stats_from_the_same_sweep(device, backend, mode, options):
    """Per position: the loss, KL(q||p) whatever the loss kind, H(p) and H(q), 0 where masked;
    the loss and gradient are those of the call without statistics (up to the kernels' rounding:
    a compiler may fuse a multiply-add differently in the variant that also keeps p and q)."""
    s, t, r = (x.reshape(2, 3, 301) for x in streams(6, 301, torch.float32, device, count=3))
    r = r if mode == "pmi" else None
    mask = (LABELS != -100).to(device)
    s.requires_grad_(True)
    loss, stats = pmi_kl(s, t, r, mask=mask, return_stats=True, backend=backend, **options)
    (grad,) = torch.autograd.grad(loss, s)
    plain = pmi_kl(s, t, r, mask=mask, backend=backend, **options)
    (plain_grad,) = torch.autograd.grad(plain, s)
    assert_close(loss, plain, torch.float32, "loss with statistics", factor=0.01)
    assert_close(grad, plain_grad, torch.float32, "gradient with statistics", factor=0.01)
    per_row = pmi_kl_reference(upcast(s), upcast(t), upcast(r), mask=mask.cpu(), reduction="none", **options)
    assert_close(stats["loss"], per_row, torch.float32, "loss", atol=1e-6)
    for key, want in reference_stats(s, t, r, **options).items():
        assert_close(stats[key], torch.where(mask.cpu(), want, 0.0), torch.float32, key, factor=3, atol=1e-5)
    assert set(stats) == {"loss", "kl_target_student", "entropy_student", "entropy_target"}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("device,backend", PATHS)
def test_fused_return_stats(device, backend, reduction):
    (h, h_t, h_r), w = hidden_inputs(device)
    mask = (LABELS != -100).to(device)
    loss, stats = fused_pmi_kl(
        h, w, h_t, h_r, mask=mask, reduction=reduction, return_stats=True, backend=backend, jsd_beta=0.0
    )
    plain = fused_pmi_kl(h, w, h_t, h_r, mask=mask, reduction=reduction, backend=backend, jsd_beta=0.0)
    assert_close(loss, plain, torch.float32, "loss with statistics", factor=0.01)
    s, t, r = (linear_logits(upcast(x), upcast(w)) for x in (h, h_t, h_r))
    want = reference_stats(s, t, r)
    ref = fused_pmi_kl_reference(
        upcast(h), upcast(w), upcast(h_t), upcast(h_r), mask=mask.cpu(), reduction="none", jsd_beta=0.0
    )
    assert_close(stats["loss"], ref, torch.float32, "loss", atol=1e-6)
    for key in want:
        assert_close(stats[key], torch.where(mask.cpu(), want[key], 0.0), torch.float32, key, factor=3, atol=1e-5)


def test_modules_take_options_in_the_constructor():
    s, t, r = streams(4, 20, count=3)
    mask = torch.tensor([1, 1, 0, 1])
    assert torch.equal(
        PMIKLLoss(beta=2.0, jsd_beta=0.0)(s, t, r, mask=mask), pmi_kl(s, t, r, mask=mask, beta=2.0, jsd_beta=0.0)
    )
    h = [torch.randn(4, 6) for _ in range(3)]
    w, b = torch.randn(20, 6), torch.randn(20)
    module = FusedPMIKLLoss(clip=None, reduction="sum")
    assert torch.equal(
        module(h[0], w, h[1], h[2], lm_head_bias=b, normalizer=3),
        fused_pmi_kl(h[0], w, h[1], h[2], lm_head_bias=b, clip=None, reduction="sum", normalizer=3),
    )
    assert "clip=None" in repr(module)
    for bad in (
        dict(mask=mask),
        dict(betta=1.0),
        dict(beta=-1.0),
        dict(check_finite="yes"),
        dict(backend="tpu"),
        dict(ignore_index=1.5),
        dict(process_group="x"),
    ):  # the last two: refused at the first call before
        with pytest.raises(ValueError):
            PMIKLLoss(**bad)
    with pytest.raises(ValueError, match="unknown arguments"):
        PMIKLLoss()(s, t, r, beta=2.0)


@pytest.mark.parametrize("fn_name", ["pmi_kl", "fused_pmi_kl"])
def test_double_backward_is_a_clear_error(fn_name):
    with pytest.raises(RuntimeError, match="no second derivative"):
        s, t, r = streams(3, 10, count=3)
        s.requires_grad_(True)
        loss = (
            pmi_kl(s, t, r) if fn_name == "pmi_kl" else fused_pmi_kl(s[:, :4], torch.randn(10, 4), t[:, :4], r[:, :4])
        )
        torch.autograd.grad(loss, s, create_graph=True)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fn_name", ["pmi_kl", "fused_pmi_kl"])
def test_retained_graph_and_gradients_the_caller_modifies(fn_name, reduction):
    """The gradient handed out is the caller's: zeroing .grad in place between backwards through
    a retained graph changes nothing the next backward reads."""
    s, t, r = (x.reshape(2, 3, 10) for x in streams(6, 10, count=3))
    w = torch.randn(10, 10, requires_grad=True)
    s.requires_grad_(True)
    loss = (
        pmi_kl(s, t, r, reduction=reduction) if fn_name == "pmi_kl" else fused_pmi_kl(s, w, t, r, reduction=reduction)
    )
    leaves = [s] if fn_name == "pmi_kl" else [s, w]
    loss.backward(retain_graph=True)
    first = [x.grad.clone() for x in leaves]
    for scale in (1.0, 2.0, 1.0):
        for x in leaves:
            x.grad.zero_()
        (loss * scale).backward(retain_graph=True)
        assert all(torch.allclose(x.grad, g * scale, rtol=1e-6, atol=1e-9) for x, g in zip(leaves, first))
    # autograd.grad hands the gradients over directly: scaling them in place must not reach the graph.
    for _ in range(2):
        handed = torch.autograd.grad(loss, leaves, retain_graph=True)
        assert all(torch.allclose(x, g, rtol=1e-6, atol=1e-9) for x, g in zip(handed, first))
        for x in handed:
            x.mul_(0.5)


def test_compile_with_labels_normalizer_and_stats():
    s, t, r = streams(6, 40, count=3)
    labels = torch.tensor([3, -100, 5, 6, -100, 1])

    def loss_fn(student):
        loss, stats = pmi_kl(
            student, t, r, labels=labels, normalizer=torch.tensor(4.0), return_stats=True, check_finite=False
        )
        return loss, stats["kl_target_student"]

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    eager_s, traced_s = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    (l1, k1), (l2, k2) = loss_fn(eager_s), compiled(traced_s)
    (g1,), (g2,) = torch.autograd.grad(l1, eager_s), torch.autograd.grad(l2, traced_s)
    assert torch.allclose(l1, l2) and torch.allclose(k1, k2) and torch.allclose(g1, g2)


def test_compile_with_dynamic_shapes():
    """torch.compile(dynamic=True) traces float options as symbols: the options' checks read
    them (math.isfinite) and broke the graph before they stepped aside under tracing."""
    compiled = torch.compile(
        lambda s, t, r: pmi_kl(s, t, r, beta=2.0, jsd_beta=0.3, check_finite=False),
        fullgraph=True,
        dynamic=True,
        backend="aot_eager",
    )
    for rows in (5, 9):
        s, t, r = streams(rows, 30, count=3)
        assert torch.allclose(compiled(s, t, r), pmi_kl(s, t, r, beta=2.0, jsd_beta=0.3))


@pytest.mark.parametrize("fn_name", ["pmi_kl", "fused_pmi_kl"])
def test_a_float_normalizer_keeps_fp64(fn_name):
    """normalizer=3.7 with fp64 inputs divides in fp64: it was rounded through fp32 (1.3e-8 off)."""
    normalizer = 1.0 + 9.0 * torch.rand((), dtype=torch.float64).item()  # almost never an fp32 value
    if fn_name == "pmi_kl":
        s, t, r = streams(4, 37, torch.float64, count=3)
    else:
        (s, t, r), w = hidden_inputs("cpu")
        s, t, r, w = (x.double() for x in (s, t, r, w))
    s.requires_grad_(True)

    def run(**kwargs):
        return pmi_kl(s, t, r, **kwargs) if fn_name == "pmi_kl" else fused_pmi_kl(s, w, t, r, **kwargs)

    total = run(reduction="sum")
    (total_grad,) = torch.autograd.grad(total, s)
    for reduction in ("mean", "sum"):
        loss = run(reduction=reduction, normalizer=normalizer)
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.allclose(loss, total / normalizer, rtol=1e-14, atol=0), (normalizer, loss - total / normalizer)
        assert torch.allclose(grad, total_grad / normalizer, rtol=1e-13, atol=1e-300), normalizer


NUMERIC_OPTIONS = {
    "beta": (0.2, 5.0),
    "clip": (0.5, 20.0),
    "temperature": (0.3, 3.0),
    "jsd_beta": (0.0, 1.0),
    "entry_clip": (1e-3, 1.0),
    "normalizer": (0.5, 50.0),
}


def numeric_forms(value):
    """value written every way a numeric option takes: Python, numpy, 0-d tensors (fp32 ones
    only where value is an fp32 number, integer ones where it is an integer)."""
    import numpy as np

    forms = [np.float64(value), torch.tensor(value, dtype=torch.float64)]
    if float(np.float32(value)) == value:
        forms += [np.float32(value), torch.tensor(value, dtype=torch.float32)]
    if value == int(value):
        forms += [int(value), np.int64(value), torch.tensor(int(value))]
    return forms


@pytest.mark.parametrize("name", NUMERIC_OPTIONS)
def test_every_numeric_option_takes_one_set_of_forms(name):
    """One rule for every numeric option: Python and numpy numbers and 0-d real tensors give the
    Python float's loss (jsd_beta=np.float32(0.5) was refused, beta=np.float32(1.0) accepted);
    bools, strings, other tensors are refused by name, in every function and module."""
    import numpy as np

    low, high = NUMERIC_OPTIONS[name]
    drawn = low + (high - low) * torch.rand(()).item()
    s, t, r = streams(3, 10, torch.float64, count=3)
    h, w = [torch.randn(3, 4, dtype=torch.float64) for _ in range(3)], torch.randn(10, 4, dtype=torch.float64)
    calls = {
        "pmi_kl": lambda v: pmi_kl(s, t, r, **{name: v}),
        "fused_pmi_kl": lambda v: fused_pmi_kl(h[0], w, h[1], h[2], **{name: v}),
        "PMIKLLoss": lambda v: (PMIKLLoss(**{name: v}) if name != "normalizer" else PMIKLLoss())(
            s, t, r, **({name: v} if name == "normalizer" else {})
        ),
    }
    if name in ("beta", "clip", "temperature"):
        calls["pmi_diagnostics"] = lambda v: pmi_diagnostics(s, t, r, **{name: v})["kl_target_student"]
    for value in (drawn, float(np.float32(drawn)), float(round(drawn)) if round(drawn) >= low else high):
        for function, run in calls.items():
            want = run(value)
            for form in numeric_forms(value):
                assert torch.equal(run(form), want), (function, name, value, form)
    for bad in (
        True,
        np.bool_(True),
        "1",
        torch.ones(1),
        torch.tensor(True),
        torch.tensor(1 + 0j),
        torch.tensor(1.0, device="meta"),
        torch.tensor(1.0).to_sparse(),
    ):
        for run in calls.values():
            with pytest.raises(ValueError, match=f"^{name} must be a finite number in"):
                run(bad)


# ---- the code's layering -----------------------------------------------------------------------
PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "pmi_kernels"
# The modules the layering checks below read: the trainer, the integrations, the shared prompts.
MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path) -> Iterator[Tuple[int, str, Optional[str]]]:
    """(line, module, name) of every import in the file, relative ones resolved to absolute
    names; name is None for `import module`."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                yield node.lineno, base, alias.name


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_names(tree: ast.AST) -> Set[str]:
    """The underscore names a module defines: functions, classes, module or local variables,
    and attributes it sets on self or cls."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            names.add(node.attr)
    return {name for name in names if private(name)}


def test_the_integrations_import_no_trainer_code():
    """TRL's and verl's integrations read the contexts' templates and token layout from the
    neutral pmi_kernels.prompts: a change in the trainer cannot break them. Fails on any import
    of pmi_kernels.train (or of a name from it) under integrations/."""
    found = []
    for path in sorted((PACKAGE / "integrations").rglob("*.py")):
        for line, module, name in imports(path):
            target = module if name is None else f"{module}.{name}"
            if target == "pmi_kernels.train" or target.startswith("pmi_kernels.train."):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {target}")
    assert not found, found


def test_no_module_uses_another_modules_underscore_names():
    """The library's layers, the backends and the trainer's parts talk through public names: no
    module imports another's underscore name, nor reads one of its attributes or methods
    (obj._name, where another module of the package defines _name and this one does not). Fails
    on a part reaching into the Trainer's private methods, as drift.py once did, or on the Triton
    diagnostics kernel importing the row kernel's _load_tile."""
    trees = {path: ast.parse(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}
    defined = {path: private_names(tree) for path, tree in trees.items()}
    modules = {module_name(path) for path in trees}
    found = []
    for path in MODULES:
        others = set().union(*(names for other, names in defined.items() if other != path)) - defined[path]
        where = path.relative_to(PACKAGE.parent)
        for line, module, name in imports(path):
            if name is not None and private(name) and module in modules:
                found.append(f"{where}:{line}: imports {module}.{name}")
        for node in ast.walk(trees[path]):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in others
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found
