"""PPAP: noise-range expert routing, one shared backbone, distillation losses, save/load and guidance."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import visadapt
from visadapt import inject
from visadapt.io import read_adapter_metadata
from visadapt.plugins.ppap import (
    ExpertBatchNorm,
    classifier_distillation_loss,
    copy_expert,
    dense_distillation_loss,
    expert_index,
    expert_parameters,
    expert_ranges,
    guide,
    save_experts,
    use_expert,
)


def tiny_resnet(num_classes: int = 4):
    from timm.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, (1, 1, 1, 1), num_classes=num_classes, channels=(8, 16, 16, 16))


def tiny_vit(num_classes: int = 4):
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32,
                             depth=2, num_heads=2, num_classes=num_classes)


BUILDERS = {"resnet": tiny_resnet, "vit": tiny_vit}


def randomize_experts(model, scale: float = 0.1) -> None:
    """Give every expert its own non-trivial values (B starts at zero, so fresh experts equal the base)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if inject.ADAPTERS_ATTR in name:
                param.add_(torch.randn_like(param) * scale)


def base_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if inject.ADAPTERS_ATTR not in k}


# ------------------------------------------------------------------------------------------------ routing


def test_expert_ranges_are_uniform_in_timestep_index():
    assert expert_ranges(5, 1000) == [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]
    assert expert_ranges(3, 1000) == [(0, 333), (333, 666), (666, 1000)]
    with pytest.raises(ValueError, match="num_experts"):
        expert_ranges(0, 1000)


def test_routing_boundaries():
    assert [expert_index(t, 5) for t in (0, 199, 200, 399, 400, 799, 800, 999)] == [0, 0, 1, 1, 2, 3, 4, 4]
    assert expert_index(199.9, 5) == 0 and expert_index(200.0, 5) == 1  # Euler-type float timesteps
    t = torch.tensor([0, 199, 200, 600, 999])
    routed = expert_index(t, 5)
    assert routed.dtype == torch.long and routed.tolist() == [0, 0, 1, 3, 4]
    # every timestep of an expert's training range routes back to that expert
    for i, (lo, hi) in enumerate(expert_ranges(3, 1000)):
        assert set(expert_index(torch.arange(lo, hi), 3).tolist()) == {i}
    for bad in (1000, -1):
        with pytest.raises(ValueError, match="outside"):
            expert_index(bad, 5)
    with pytest.raises(ValueError, match="outside"):
        expert_index(torch.tensor([5, 1000]), 5)


def _official_sampler_expert(t: int, n_experts: int, num_timesteps: int) -> int:
    """Restatement of the official `MultiExpertWrapper.step_to_classifier_index` (riiid/PPAP,
    guided_diffusion/multi_expert_helper.py): the first expert whose inclusive range [b_i, b_{i+1}] holds t."""
    step_range = [int(i * num_timesteps / n_experts) for i in range(n_experts + 1)]
    for i in range(len(step_range)):
        if step_range[i] <= t <= step_range[i + 1]:
            return i
    raise AssertionError(f"t={t} is in no range")


@pytest.mark.parametrize("n, big_t", [(5, 1000), (3, 1000), (7, 1000), (4, 50)])
def test_official_routing_is_the_official_samplers_rule_at_every_timestep(n, big_t):
    every_t = list(range(big_t))
    official = [_official_sampler_expert(t, n, big_t) for t in every_t]
    assert [expert_index(t, n, big_t, routing="official") for t in every_t] == official
    assert expert_index(torch.tensor(every_t), n, big_t, routing="official").tolist() == official
    # the two routings differ exactly at the inner range boundaries, where the official one picks the lower expert
    ranged = expert_index(torch.tensor(every_t), n, big_t).tolist()
    differ = [t for t in every_t if ranged[t] != official[t]]
    assert differ == [lo for lo, _ in expert_ranges(n, big_t)[1:]]
    assert all(official[t] == ranged[t] - 1 for t in differ)
    if (n, big_t) == (5, 1000):
        assert differ == [200, 400, 600, 800]


def test_routing_option_is_validated_and_reaches_guidance():
    with pytest.raises(ValueError, match="routing"):
        expert_index(200, 5, routing="inclusive")
    with pytest.raises(ValueError, match="routing"):
        visadapt.attach(tiny_vit(), "ppap", routing="lower")


# ------------------------------------------------------------------------------------------------- losses


def test_classifier_distillation_loss_equals_reference():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    total = 0.0
    for b in range(3):
        p = [float(v) for v in torch.softmax(teacher[b] / 0.25, dim=0)]
        q = [float(v) for v in torch.softmax(student[b], dim=0)]
        total += sum(pk * (torch.tensor(pk).log() - torch.tensor(qk).log()).item() for pk, qk in zip(p, q)) / 7
    expected = total / 3
    assert classifier_distillation_loss(student, teacher) == pytest.approx(expected, rel=1e-5)
    # equals PyTorch's KLDivLoss as the official code uses it
    kl = torch.nn.KLDivLoss(reduction="none")(F.log_softmax(student, -1), F.softmax(teacher / 0.25, -1))
    assert torch.allclose(classifier_distillation_loss(student, teacher), kl.mean(-1).mean())
    assert classifier_distillation_loss(teacher / 0.25, teacher).abs() < 1e-6  # zero when q_S = p_T
    with pytest.raises(ValueError, match="batch, classes"):
        classifier_distillation_loss(student, teacher[:, :3])


def test_dense_distillation_loss_is_mse():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    expected = sum(float(d) ** 2 for d in (student - teacher).flatten()) / student.numel()
    assert dense_distillation_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="shape"):
        dense_distillation_loss(student, teacher[:, :, :2])


# ------------------------------------------------------------------------------------- one shared backbone


@pytest.mark.parametrize("family", list(BUILDERS))
def test_one_backbone_in_memory_regardless_of_num_experts(family):
    counts = {}
    for n in (1, 2, 5):
        torch.manual_seed(0)
        model = BUILDERS[family]()
        base_params = {id(p): p.data_ptr() for p in model.parameters()}
        base_count = sum(p.numel() for p in model.parameters())
        visadapt.attach(model, "ppap", num_experts=n, rank=4)
        named = list(model.named_parameters())
        # the base tensors are the very same objects and storages: nothing was copied
        base_now = [p for name, p in named if inject.ADAPTERS_ATTR not in name]
        assert {id(p): p.data_ptr() for p in base_now} == base_params
        assert sum(p.numel() for p in base_now) == base_count
        counts[n] = sum(p.numel() for name, p in named if inject.ADAPTERS_ATTR in name)
        assert all(not p.requires_grad for p in base_now)
    assert counts[5] == 5 * counts[1] and counts[2] == 2 * counts[1]
    assert counts[1] < 0.5 * base_count


@pytest.mark.parametrize("family", list(BUILDERS))
def test_lora_and_norm_sites_follow_the_spec(family):
    model = BUILDERS[family]()
    visadapt.attach(model, "ppap", num_experts=2, rank=4)
    kinds = {(item.host_path.split(".")[-1], item.kind) for item in inject.attached(model)}
    if family == "vit":
        assert {("qkv", "qkv"), ("proj", "proj"), ("fc1", "fc1"), ("fc2", "fc2"), ("head", "head")} == kinds
        lora_hosts = {i.host_path for i in inject.attached(model) if i.module.experts is not None}
        assert lora_hosts == {f"blocks.{b}.attn.{n}" for b in (0, 1) for n in ("qkv", "proj")}
    else:
        lora_hosts = {i.host_path for i in inject.attached(model) if getattr(i.module, "experts", None)}
        assert lora_hosts == {"conv1"} | {f"layer{s}.0.conv{c}" for s in (1, 2, 3, 4) for c in (1, 2)}
        bn_hosts = [i for i in inject.attached(model) if isinstance(i.module, ExpertBatchNorm)]
        assert len(bn_hosts) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        lora = inject.attached(model, "default")[0].module.experts[0]
        assert lora.scaling == 8.0 / 4


@pytest.mark.parametrize("family", list(BUILDERS))
def test_switching_experts_changes_outputs_only(family):
    torch.manual_seed(0)
    model = BUILDERS[family]().eval()
    x = torch.randn(2, 3, 16, 16)
    base_out = model(x)
    visadapt.attach(model, "ppap", num_experts=3, rank=4)
    assert torch.equal(model(x), base_out)  # fresh experts are the base model
    randomize_experts(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    outs = []
    for i in range(3):
        use_expert(model, i)
        outs.append(model(x))
    with use_expert(model, None):
        assert torch.equal(model(x), base_out)  # experts off: the frozen model
    assert all(not torch.allclose(outs[i], outs[j]) for i in range(3) for j in range(i))
    with use_expert(model, 0):
        assert torch.equal(model(x), outs[0])
    assert torch.equal(model(x), outs[2])  # the context manager restored routing
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="out of range"):
        use_expert(model, 3)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_training_expert_changes_only_its_tensors(family):
    torch.manual_seed(0)
    teacher = BUILDERS[family]().eval()
    student = BUILDERS[family]()
    student.load_state_dict(teacher.state_dict())
    visadapt.attach(student, "ppap", num_experts=3, rank=4)
    randomize_experts(student, 0.02)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    student.train()
    use_expert(student, 1)
    optimizer = torch.optim.AdamW(visadapt.trainable_parameters(student), lr=1e-2, weight_decay=0.05)
    x0 = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        teacher_logits = teacher(x0)
    losses = []
    for _ in range(4):
        loss = classifier_distillation_loss(student(x0 + 0.3 * torch.randn_like(x0)), teacher_logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = student.state_dict()
    expert1 = {id(p) for p in expert_parameters(student, 1)}
    names = {id(p): n for n, p in student.named_parameters()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {names[i] for i in expert1}
    if family == "resnet":  # expert 1's running statistics move too, row 1 of the (N, C) buffers
        for key in [k for k in changed if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]:
            assert torch.equal(before[key][[0, 2]], after[key][[0, 2]]) and inject.ADAPTERS_ATTR in key
            expected.add(key)
    assert changed == expected
    assert losses[-1] < losses[0]


def test_copy_expert_gives_the_warm_start():
    torch.manual_seed(0)
    model = tiny_resnet()
    visadapt.attach(model, "ppap", num_experts=3, rank=4)
    randomize_experts(model)
    model.train()
    with use_expert(model, 0):
        model(torch.randn(4, 3, 16, 16))  # expert 0's running statistics move
    copy_expert(model, 0, 2)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with use_expert(model, 0):
        out0 = model(x)
    with use_expert(model, 2):
        assert torch.equal(model(x), out0)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_detach_restores_every_tensor(family):
    torch.manual_seed(0)
    model = BUILDERS[family]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    visadapt.attach(model, "ppap", num_experts=2, rank=4)
    randomize_experts(model)
    model.train()
    for i in range(2):
        with use_expert(model, i):
            model(torch.randn(4, 3, 16, 16)).sum().backward()
    visadapt.detach(model)
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(inject.ADAPTERS_ATTR in name for name, _ in model.named_modules())


@pytest.mark.parametrize("family", list(BUILDERS))
def test_save_load_round_trips_all_experts(family, tmp_path):
    torch.manual_seed(0)
    model = BUILDERS[family]()
    fresh = BUILDERS[family]()
    fresh.load_state_dict(model.state_dict())
    visadapt.attach(model, "ppap", num_experts=3, rank=4)
    randomize_experts(model)
    model.train()
    for i in range(3):
        with use_expert(model, i):
            model(torch.randn(4, 3, 16, 16))
    model.eval()
    path = save_experts(model, tmp_path / "ppap_experts.safetensors")
    meta = read_adapter_metadata(path)
    assert json.loads(meta["ppap.expert_ranges"]) == [[0, 333], [333, 666], [666, 1000]]
    assert json.loads(meta["config"])["num_experts"] == 3
    visadapt.load_adapter(fresh, path)
    fresh.eval()
    x = torch.randn(2, 3, 16, 16)
    for i in range(3):
        with use_expert(model, i), use_expert(fresh, i):
            assert torch.equal(model(x), fresh(x))
    stored = visadapt.read_adapter_file(path)[0]
    assert set(stored) == set(inject.adapter_state(model, "default"))


def test_merge_is_refused_with_the_reason():
    model = tiny_vit()
    visadapt.attach(model, "ppap", num_experts=2, rank=4)
    with pytest.raises(ValueError, match="routes every call"):
        visadapt.merge(model)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="rank"):
        visadapt.attach(tiny_vit(), "ppap", rank=0)
    with pytest.raises(ValueError, match="num_experts"):
        visadapt.attach(tiny_vit(), "ppap", num_experts=2000)


# ----------------------------------------------------------------------------------------------- guidance


def tiny_pixel_pipeline(kind: str, clip_sample: bool = False):
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    if kind == "ddim":
        return DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=clip_sample))
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000, clip_sample=clip_sample))


def guidance_classifier(**config):
    torch.manual_seed(1)
    model = tiny_resnet()
    visadapt.attach(model, "ppap", num_experts=5, rank=4, **config)
    randomize_experts(model, 0.2)
    return model.eval()


def log_p(classifier, x, labels, expert):
    with torch.no_grad(), use_expert(classifier, expert):
        return F.log_softmax(classifier(x), -1).gather(1, labels[:, None])[:, 0]


def unet_eps(pipe, x, t):
    with torch.no_grad():
        return pipe.unet(x, t).sample


def guided_eps(pipe, classifier, x, t, labels, scale, **kw):
    with torch.no_grad(), guide(pipe, classifier, target=labels, scale=scale, **kw) as guidance:
        out = pipe.unet(x, t).sample
    return out, guidance


def grad_log_p(classifier, x, labels, expert):
    x = x.clone().requires_grad_(True)
    with use_expert(classifier, expert):
        log_prob = F.log_softmax(classifier(x), -1).gather(1, labels[:, None]).sum()
    return torch.autograd.grad(log_prob, x)[0]


def test_ddim_guidance_equals_the_noise_prediction_formula():
    pipe, classifier = tiny_pixel_pipeline("ddim"), guidance_classifier()
    pipe.scheduler.set_timesteps(10)
    x, labels, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 3]), pipe.scheduler.timesteps[2]  # t = 701
    eps = unet_eps(pipe, x, t)
    out, guidance = guided_eps(pipe, classifier, x, t, labels, 7.5)
    assert guidance.routed == [(int(t), 3)]
    abar = pipe.scheduler.alphas_cumprod[int(t)]
    expected = eps - 7.5 * (1 - abar).sqrt() * grad_log_p(classifier, x, labels, 3)
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, eps)
    # naive guidance: the frozen classifier, experts off
    naive, _ = guided_eps(pipe, classifier, x, t, labels, 7.5, naive=True)
    assert torch.allclose(naive, eps - 7.5 * (1 - abar).sqrt() * grad_log_p(classifier, x, labels, None), atol=1e-6)


@pytest.mark.parametrize("routing", ["range", "official"])
def test_guidance_routes_boundary_timesteps_by_the_chosen_rule(routing):
    """DDIM with 25 steps and steps_offset=0 visits 0, 40, ..., 960: all four boundaries 200/400/600/800."""
    pipe, classifier = tiny_pixel_pipeline("ddim"), guidance_classifier()
    pipe.scheduler.set_timesteps(25)
    assert {200, 400, 600, 800} <= set(pipe.scheduler.timesteps.tolist())
    x, labels, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 3]), torch.tensor(400)
    out, guidance = guided_eps(pipe, classifier, x, t, labels, 7.5, routing=routing)
    expert = 1 if routing == "official" else 2  # the official sampler's inclusive test picks the lower expert
    assert guidance.routed == [(400, expert)]
    abar = pipe.scheduler.alphas_cumprod[400]
    expected = unet_eps(pipe, x, t) - 7.5 * (1 - abar).sqrt() * grad_log_p(classifier, x, labels, expert)
    assert torch.allclose(out, expected, atol=1e-6)
    # an adapter configured with that routing guides that way without the argument
    _, by_config = guided_eps(pipe, guidance_classifier(routing=routing), x, t, labels, 7.5)
    assert by_config.routed == [(400, expert)]


def test_ddpm_guidance_shifts_the_step_mean_by_scale_sigma2_grad():
    pipe, classifier = tiny_pixel_pipeline("ddpm"), guidance_classifier()
    scheduler = pipe.scheduler
    scheduler.set_timesteps(20)
    x, labels, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 2]), scheduler.timesteps[5]
    eps = unet_eps(pipe, x, t)
    out, guidance = guided_eps(pipe, classifier, x, t, labels, 4.0)
    step = lambda e: scheduler.step(e, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    prev_t = int(scheduler.previous_timestep(t))
    abar, abar_prev = scheduler.alphas_cumprod[int(t)], scheduler.alphas_cumprod[prev_t]
    sigma2 = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
    expert = expert_index(int(t), 5)
    shift = 4.0 * sigma2 * grad_log_p(classifier, x, labels, expert)
    assert torch.allclose(step(out) - step(eps), shift, atol=1e-5)
    assert guidance.routed == [(int(t), expert)]


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_scale_zero_is_exactly_unguided_and_guidance_raises_log_p(kind):
    # clip_sample (the schedulers' default) keeps the untrained UNet's samples in range
    pipe, classifier = tiny_pixel_pipeline(kind, clip_sample=True), guidance_classifier()
    labels = torch.tensor([0, 1, 2, 3])
    steps = 8

    def sample(**guidance):
        generator = torch.Generator().manual_seed(0)
        if not guidance:
            return pipe(batch_size=4, generator=generator, num_inference_steps=steps, output_type="np",
                        return_dict=False)[0]
        with guide(pipe, classifier, target=labels, **guidance):
            return pipe(batch_size=4, generator=generator, num_inference_steps=steps, output_type="np",
                        return_dict=False)[0]

    plain = sample()
    assert (sample(scale=0.0) == plain).all()
    guided = sample(scale=30.0)
    to_tensor = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2) * 2 - 1
    before = log_p(classifier, to_tensor(plain), labels, 0)
    after = log_p(classifier, to_tensor(guided), labels, 0)
    assert after.mean() > before.mean() + 0.05


def test_latent_pipeline_guidance_through_the_decoder_with_cfg():
    from visadapt.backbones import create_tiny_sd_pipeline

    pipe = create_tiny_sd_pipeline()
    classifier = guidance_classifier()
    labels = torch.tensor([2])

    def run(scale, cfg):
        with guide(pipe, classifier, target=labels, scale=scale) as guidance:
            image = pipe("a red square", num_inference_steps=3, guidance_scale=cfg, height=32, width=32,
                         output_type="pt", generator=torch.Generator().manual_seed(0)).images
        return image, guidance

    plain = pipe("a red square", num_inference_steps=3, guidance_scale=3.0, height=32, width=32, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    zero, _ = run(0.0, 3.0)
    assert torch.equal(zero, plain)
    guided, guidance = run(200.0, 3.0)
    assert [expert for _, expert in guidance.routed] == [expert_index(int(t), 5) for t in pipe.scheduler.timesteps]
    assert not torch.allclose(guided, plain)
    # the CFG batch [uncond, cond] shares one gradient: the combined prediction moves by the full shift
    latents = torch.randn(1, 4, 16, 16)
    t = pipe.scheduler.timesteps[0]
    context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        eps = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample
        with guide(pipe, classifier, target=labels, scale=5.0) as guidance:
            out = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample
            single = guidance.gradient(latents, t.item())
    abar = pipe.scheduler.alphas_cumprod[int(t)]
    assert torch.allclose(out - eps, (-5.0 * (1 - abar).sqrt() * single).repeat(2, 1, 1, 1), atol=1e-5)


def test_dense_guidance_moves_the_prediction_toward_the_target():
    from diffusers import DDIMPipeline

    torch.manual_seed(0)
    pipe = tiny_pixel_pipeline("ddim")
    assert isinstance(pipe, DDIMPipeline)
    regressor = tiny_resnet(num_classes=6)
    visadapt.attach(regressor, "ppap", num_experts=5, rank=4)
    regressor.eval()
    target = torch.zeros(6)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor(100)
    with guide(pipe, regressor, target=target, kind="dense", scale=1.0) as guidance:
        g = guidance.gradient(x, 100)
    with torch.no_grad(), use_expert(regressor, 0):
        err = (regressor(x) - target).pow(2).mean(1)
        err_after = (regressor(x + 1e-2 * g / g.norm()) - target).pow(2).mean(1)
    assert (err_after < err).all()
    out, _ = guided_eps(pipe, regressor, x, t, target, 1.0, kind="dense", rescale=True)
    abar = pipe.scheduler.alphas_cumprod[100]
    shift = out - unet_eps(pipe, x, t)
    assert torch.allclose(shift.norm(), (1 - abar).sqrt() * x[:1].norm(), rtol=1e-4)


def test_guide_errors_are_clear():
    pipe = tiny_pixel_pipeline("ddim")
    plain = tiny_resnet()
    with pytest.raises(ValueError, match="no PPAP experts"):
        guide(pipe, plain, target=0)
    with pytest.raises(ValueError, match="kind"):
        guide(pipe, guidance_classifier(), target=0, kind="depth")
    with pytest.raises(ValueError, match="integer class labels"):
        guide(pipe, guidance_classifier(), target=torch.zeros(2))
