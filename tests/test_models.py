import pytest
import timm
import torch
from torch import nn

from bench.errors import UnknownNameError, UserError
from bench.models import (
    OUR_ARCHS,
    check_arch,
    create_network,
    default_depth,
    embed,
    parse_arch,
    split_arch_list,
    vit_patch_size,
)

SIZES = [(1, 8), (1, 28), (3, 32)]
TOO_DEEP = {("convnetd4", 8), ("convnetd5", 8)}
CASES = [(n, c, s) for n in OUR_ARCHS for c, s in SIZES if (n, s) not in TOO_DEEP] + [("convnet", 3, 64)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name,in_chans,img_size", CASES)
def test_every_arch_builds_forwards_and_backprops(name, in_chans, img_size):
    model = timm.create_model(name, num_classes=3, in_chans=in_chans, img_size=img_size)
    x = torch.randn(2, in_chans, img_size, img_size, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 3)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert embed(model, x).shape == (2, model.num_features)


@pytest.mark.parametrize("name,img_size", sorted(TOO_DEEP))
def test_too_deep_convnet_says_so(name, img_size):
    with pytest.raises(ValueError, match="use depth"):
        timm.create_model(name, num_classes=3, in_chans=1, img_size=img_size)
    with pytest.raises(UserError, match="use depth"):
        create_network(name, 3, 1, img_size, _gen(0))


def test_our_names_live_in_timms_registry():
    assert len(OUR_ARCHS) == len(set(OUR_ARCHS)) == 20
    assert all(timm.is_model(n) for n in OUR_ARCHS)
    assert set(OUR_ARCHS) <= set(timm.list_models())


def test_pretrained_is_refused_and_timm_args_are_ignored():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("convnet", pretrained=True)
    model = timm.create_model("convnet", pretrained_cfg_overlay={}, cache_dir="/nowhere", num_classes=4)
    assert model.num_classes == 4


@pytest.mark.parametrize("img_size,depth", [(8, 1), (16, 2), (28, 3), (32, 3), (64, 4), (128, 5)])
def test_convnet_depth_follows_resolution(img_size, depth):
    assert default_depth(img_size) == depth
    model = timm.create_model("convnet", num_classes=10, in_chans=3, img_size=img_size)
    assert len(model.features) == depth
    side = (32 if img_size == 28 else img_size) >> depth  # DC processes 28×28 as 32×32
    assert model.num_features == 128 * side * side
    assert model.classifier.in_features == model.num_features


def test_convnet_norms():
    def norms(name):
        model = timm.create_model(name, img_size=32)
        return [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]

    instance = norms("convnet")
    assert len(instance) == 3
    assert all(isinstance(m, nn.GroupNorm) and m.num_groups == m.num_channels == 128 and m.affine for m in instance)
    assert [type(m) for m in norms("convnet_bn")] == [nn.BatchNorm2d] * 3
    assert all(isinstance(m, nn.GroupNorm) and m.num_groups == 1 for m in norms("convnet_ln"))
    assert norms("convnet_nn") == []
    assert any(isinstance(m, nn.MaxPool2d) for m in timm.create_model("convnet_maxpool").modules())
    vgg, resnet = timm.create_model("vgg11_cifar"), timm.create_model("resnet18_cifar_bn")
    assert all(m.num_groups == m.num_channels for m in vgg.modules() if isinstance(m, nn.GroupNorm))
    assert not any(isinstance(m, nn.GroupNorm) for m in resnet.modules())


@pytest.mark.parametrize("in_chans,img_size,side", [(1, 28, 4), (3, 32, 4), (3, 64, 4)])
def test_convnet_embed_is_width_times_side_squared(in_chans, img_size, side):
    model = timm.create_model("convnet_w32", num_classes=10, in_chans=in_chans, img_size=img_size)
    feats = model.embed(torch.randn(2, in_chans, img_size, img_size))
    assert feats.shape == (2, 32 * side * side) and model.num_features == 32 * side * side


def test_overrides_reach_the_constructor():
    model = timm.create_model("convnet", num_classes=10, in_chans=1, img_size=8, depth=2)
    assert len(model.features) == 2 and model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    model = create_network("convnet[width=64]", 10, 3, 32, _gen(0))
    assert model.features[0][0].conv.out_channels == 64 and model.num_features == 64 * 4 * 4
    model = create_network("convnetd1[norm=batch,pooling=max]", 10, 3, 32, _gen(0))
    assert isinstance(model.features[0][0].norm, nn.BatchNorm2d) and isinstance(model.features[0][1], nn.MaxPool2d)


def test_vit_tiny_cifar_patch_size():
    assert [vit_patch_size(s) for s in (8, 28, 32, 64)] == [1, 2, 4, 8]
    vit = timm.create_model("vit_tiny_cifar", num_classes=10, in_chans=3, img_size=32)
    assert vit.patch_embed.patch_size == (4, 4) and len(vit.blocks) == 6 and vit.embed_dim == 192
    vit = create_network("vit_tiny_cifar[patch_size=2,depth=2]", 10, 1, 8, _gen(0))
    assert vit.patch_embed.patch_size == (2, 2) and len(vit.blocks) == 2


@pytest.mark.parametrize("spec", ["resnet18", "vit_tiny_patch16_224[patch_size=2]"])
def test_timm_models_build_through_create_network(spec):
    model = create_network(spec, 10, 1, 8, _gen(0))
    x = torch.randn(2, 1, 8, 8)
    assert model(x).shape == (2, 10)
    assert embed(model, x).shape == (2, model.num_features)


@pytest.mark.parametrize("spec", ["convnet", "vit_tiny_cifar[depth=1]", "resnet18"])
def test_weights_come_from_the_generator_alone(spec):
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    a = create_network(spec, 10, 1, 8, _gen(7)).state_dict()
    b = create_network(spec, 10, 1, 8, _gen(7)).state_dict()
    c = create_network(spec, 10, 1, 8, _gen(8)).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_create_network_advances_the_generator():
    g = _gen(0)
    a = create_network("convnet", 10, 1, 8, g)
    b = create_network("convnet", 10, 1, 8, g)
    assert not torch.equal(a.classifier.weight, b.classifier.weight)


def test_parse_arch():
    assert parse_arch("convnet") == ("convnet", {})
    assert parse_arch("convnet[width=64,norm=batch]") == ("convnet", {"width": 64, "norm": "batch"})
    assert parse_arch(" vit_tiny_patch16_224[patch_size=2, depth=4] ") == (
        "vit_tiny_patch16_224",
        {"patch_size": 2, "depth": 4},
    )
    name, kw = parse_arch("vit_tiny_cifar[drop_rate=0.1,drop_path_rate=1e-2,class_token=false,pooling=none,x=[1,2]]")
    assert kw == {"drop_rate": 0.1, "drop_path_rate": 0.01, "class_token": False, "pooling": "none", "x": [1, 2]}
    assert parse_arch("resnet18.a1_in1k") == ("resnet18.a1_in1k", {})


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "conv net",
        "convnet[width=64",
        "convnet]",
        "convnet[width=64]x",
        "convnet[width]",
        "convnet[=3]",
        "convnet[width=]",
        "convnet[width=1,width=2]",
        "convnet[width=64,]",
        "convnet[a=1]][b=2]",
        "convnet[num_classes=3]",
        "convnet[img_size=16]",
    ],
)
def test_malformed_specs_raise_one_line_user_errors(spec):
    with pytest.raises(UserError) as info:
        parse_arch(spec)
    assert "\n" not in str(info.value)


def test_split_arch_list():
    assert split_arch_list("convnet,vit_tiny_patch16_224[patch_size=2,depth=4]") == [
        "convnet",
        "vit_tiny_patch16_224[patch_size=2,depth=4]",
    ]
    assert split_arch_list(" convnet , resnet18_cifar_bn ,") == ["convnet", "resnet18_cifar_bn"]
    assert split_arch_list("convnet[width=64,depth=2]") == ["convnet[width=64,depth=2]"]
    with pytest.raises(UserError):
        split_arch_list("convnet[width=64,resnet18")
    with pytest.raises(UserError):
        split_arch_list("convnet],resnet18")


def test_check_arch():
    check_arch("convnet[width=64]")
    check_arch("resnet18")
    with pytest.raises(UnknownNameError) as info:
        check_arch("convnett")
    assert "did you mean 'convnet'" in str(info.value) and isinstance(info.value, UserError)
    with pytest.raises(UnknownNameError, match="did you mean 'resnet"):
        check_arch("resnet181")
    with pytest.raises(UserError):
        check_arch("convnet[width")


def test_bad_overrides_are_user_errors():
    with pytest.raises(UnknownNameError):
        create_network("convnett", 10, 3, 32, _gen(0))
    with pytest.raises(UserError, match="unexpected keyword argument 'wdith'"):
        create_network("convnet[wdith=64]", 10, 3, 32, _gen(0))
    with pytest.raises(UserError, match="unknown norm"):
        create_network("convnet[norm=group]", 10, 3, 32, _gen(0))


@pytest.mark.parametrize("spec, message", [
    ("convnet[width=abc]", "width must be int, got 'abc'"),
    ("convnet[width=2.5]", "width must be int, got 2.5"),
    ("convnet[depth=true]", "depth must be int or None, got True"),
    ("convnet_bn[norm=3]", "norm must be str, got 3"),
    ("resnet18_cifar[norm=5]", "norm must be str, got 5"),
])
def test_an_override_of_the_wrong_type_names_the_argument(spec, message):
    """Before, ``convnet[width=abc]`` failed inside the constructor with "not all arguments converted during
    string formatting"."""
    with pytest.raises(UserError) as caught:
        create_network(spec, 10, 3, 32, _gen(0))
    assert str(caught.value).endswith(message)


def test_overrides_of_the_declared_types_build():
    """``null`` where the constructor allows None (depth: the default for 32×32, 3), an int where it asks one."""
    model = create_network("convnet[depth=null,width=8]", 10, 3, 32, _gen(0))
    assert len(model.features) == 3 and model.features[0][0].conv.out_channels == 8
