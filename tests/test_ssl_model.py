"""DiGIT's self-supervised encoder without Ray (pipeline/models/ssl.py, pipeline/data/multicrop.py): the teacher's
EMA, the loss's view pairs and centre, patch features of the chosen block at any crop size, multi-crop views, a
student step that lowers the loss, save and load."""
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from pipeline.data.multicrop import MultiCrop, crop_box, multi_crop
from pipeline.models.settings import SSLEncoderSettings
from pipeline.models.ssl import SelfDistillation, SSLViT, distillation_loss, load_ssl_encoder, save_ssl_encoder
from pipeline.schedules import cosine_ramp, linear_ramp
from pipeline.train.ssl_step import DistillationSchedule, distillation_step, teacher_spread

SETTINGS = SSLEncoderSettings(size="mini", image_size=16, patch_size=4, channels=1, feature_block=-3,
                              head_hidden=64, head_bottleneck=16, prototypes=32)


def test_the_teacher_is_an_exponential_moving_average_of_the_student():
    torch.manual_seed(0)
    model = SelfDistillation(SETTINGS)
    for parameter in model.student.parameters():
        parameter.data.add_(torch.randn_like(parameter))
    before = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(0.9)
    for old, new, student in zip(before, model.teacher.parameters(), model.student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * student)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_the_loss_skips_a_view_paired_with_itself():
    k = 8
    confident = torch.full((1, k), -30.0)
    confident[0, 0] = 30.0  # the teacher's first view: surely class 0
    teacher = [confident, confident.clone()]
    never_zero = torch.zeros(1, k)
    never_zero[0, 0] = -1e4  # a student view that rules class 0 out: a huge loss against a class-0 target
    agreeing = confident.clone()
    student = [never_zero, agreeing, agreeing]
    teacher[1] = torch.zeros(1, k)  # uniform: view 1's target does not single out class 0
    loss = distillation_loss(student, teacher, torch.zeros(1, k), 0.1, 0.04)
    # pairs (0,1), (0,2), (1,0), (1,2): only (1,0) sees the ruled-out class, and it weighs it 1/k
    per_pair = [-(F.softmax(teacher[a] / 0.04, -1) * F.log_softmax(student[b] / 0.1, -1)).sum()
                for a, b in ((0, 1), (0, 2), (1, 0), (1, 2))]
    torch.testing.assert_close(loss, sum(per_pair) / 4)
    assert float(loss) < 1e4 / 0.1 / k  # (0, 0) would have added 1e5 at full weight


def test_the_centre_moves_towards_the_teachers_mean_in_training_only():
    torch.manual_seed(0)
    model = SelfDistillation(SETTINGS, center_momentum=0.9)
    crops = [torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16)]
    with torch.no_grad():
        expected = 0.1 * torch.cat(model.teacher(crops)).mean(0, keepdim=True)
    model.eval()(crops, [], teacher_temperature=0.04)
    assert torch.count_nonzero(model.center) == 0
    model.train()(crops, [], teacher_temperature=0.04)
    torch.testing.assert_close(model.center, expected)


def test_patch_features_come_from_the_chosen_block_at_any_crop_size():
    torch.manual_seed(0)
    encoder = SSLViT(SETTINGS).eval()
    images = torch.rand(3, 1, 16, 16)
    features = encoder.patch_features(images)
    assert features.shape == (3, 16, encoder.feature_dim)
    # by hand: the class token and positions, blocks 0 and 1 of 4 (the third from last), the final norm
    x = encoder._tokens(images)
    for block in encoder.blocks[:2]:
        x = block(x)
    torch.testing.assert_close(features, encoder.norm(x[:, 1:]))
    assert encoder.patch_features(torch.rand(2, 1, 8, 8)).shape == (2, 4, encoder.feature_dim)
    torch.testing.assert_close(encoder.positions(4, 4), encoder.pos)


def test_a_feature_block_outside_the_encoder_is_named():
    with pytest.raises(ValidationError, match="tiny ViT has 2 blocks"):
        SSLEncoderSettings(size="tiny", feature_block=-3)


def test_multi_crop_views_have_their_sizes_and_stay_in_range():
    images = torch.rand(5, 1, 28, 28)
    crops = MultiCrop(global_size=16, local_size=8, local_crops=3)
    global_views, local_views = multi_crop(images, crops, torch.Generator().manual_seed(0))
    assert [v.shape for v in global_views] == [(5, 1, 16, 16)] * 2
    assert [v.shape for v in local_views] == [(5, 1, 8, 8)] * 3
    assert all(float(v.min()) >= 0 and float(v.max()) <= 1 for v in global_views + local_views)
    generator = torch.Generator().manual_seed(1)
    for _ in range(200):
        top, left, h, w = crop_box(28, 20, (0.05, 0.4), generator)
        assert 0 <= top and top + h <= 28 and 0 <= left and left + w <= 20
        assert h * w <= 0.4 * 28 * 20 * 1.2


def test_a_student_step_lowers_the_loss_and_leaves_the_teacher_alone():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = SelfDistillation(SETTINGS).eval()  # eval: the centre stays put between the two evaluations
    # a small step: the normalised head has steep gradients (DINO clips them at 3 for that reason)
    global_views, local_views = multi_crop(torch.rand(8, 1, 28, 28), MultiCrop(16, 8, local_crops=2), generator)
    teacher = [p.clone() for p in model.teacher.parameters()]
    optimizer = torch.optim.SGD(model.student.parameters(), lr=1e-4)
    before = model(global_views, local_views, teacher_temperature=0.04)
    optimizer.zero_grad()
    before.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    optimizer.step()
    after = model(global_views, local_views, teacher_temperature=0.04)
    assert float(after) < float(before)
    assert all(torch.equal(a, b) for a, b in zip(teacher, model.teacher.parameters()))


def test_the_encoder_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    encoder = SelfDistillation(SETTINGS).encoder().eval()
    save_ssl_encoder(encoder, tmp_path / "ssl")
    loaded = load_ssl_encoder(tmp_path / "ssl")
    images = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(loaded.patch_features(images), encoder.patch_features(images))
    assert loaded.settings == SETTINGS


def test_the_schedules_start_and_end_where_dino_says():
    schedule = DistillationSchedule(steps=100, teacher_temperature_steps=30)
    assert schedule.temperature(0) == 0.04 and schedule.temperature(30) == 0.07 and schedule.temperature(99) == 0.07
    assert abs(schedule.temperature(15) - 0.055) < 1e-12
    momenta = [schedule.momentum(step) for step in range(101)]
    assert momenta[0] == 0.996 and momenta[-1] == 1.0
    assert all(b >= a for a, b in zip(momenta, momenta[1:]))
    assert linear_ramp(5, 0, 0.04, 0.07) == 0.07 and cosine_ramp(50, 100, 0.0, 1.0) == 0.5


def test_a_step_keeps_frozen_prototypes_clips_and_moves_the_teacher():
    torch.manual_seed(0)
    model = SelfDistillation(SETTINGS).train()
    # Plain SGD at lr 1: the update is the clipped gradient itself, so its norm shows the clipping.
    optimizer = torch.optim.SGD(model.student.parameters(), lr=1.0)
    schedule = DistillationSchedule(steps=10, freeze_prototypes_steps=1, grad_clip=3.0)
    crops, generator = MultiCrop(16, 8, local_crops=2), torch.Generator().manual_seed(0)
    student = [p.detach().clone() for p in model.student.parameters()]
    prototypes = model.student.head.prototypes.detach().clone()
    teacher = [p.clone() for p in model.teacher.parameters()]
    figures = distillation_step(model, optimizer, torch.rand(6, 1, 28, 28), crops, schedule, 0, generator)
    assert torch.equal(model.student.head.prototypes, prototypes)
    assert figures["grad_norm"] > 3.0  # the norm before clipping
    update = torch.stack([(new - old).norm() for old, new in zip(student, model.student.parameters())]).norm()
    assert abs(float(update) - 3.0) < 1e-3
    for old, new, moved in zip(teacher, model.teacher.parameters(), model.student.parameters()):
        torch.testing.assert_close(new, 0.996 * old + 0.004 * moved)
    distillation_step(model, optimizer, torch.rand(6, 1, 28, 28), crops, schedule, 1, generator)
    assert not torch.equal(model.student.head.prototypes, prototypes)
    spread = teacher_spread(model, torch.rand(8, 1, 16, 16), 0.04)
    assert 0 <= spread["entropy_per_image"] <= spread["entropy_of_mean"] + 1e-6 <= math.log(32) + 1e-5
