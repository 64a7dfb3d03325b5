"""DDP and FSDP2 on torch.distributed (2 processes, gloo, CPU): training equals one process on the concatenated
batch, adapters save (collectively) and hot-swap into a sharded model, a distributed checkpoint resumes exactly, and
misuse is a clear error on every rank instead of a hang."""

import copy
import datetime
from pathlib import Path

import peft
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lora_fx
from lora_fx import AdapterError, LoraSpec
from tests.conftest import ids, randomize_lora, tiny_llama

pytestmark = pytest.mark.slow
WORLD, STEPS = 2, 3
SPEC = LoraSpec(rank=4, alpha=8.0)


def batches(rank: int) -> list[torch.Tensor]:
    return [ids(2, 8, seed=100 * step + rank) for step in range(STEPS)]


def adapted_llama():
    torch.manual_seed(0)
    gm = lora_fx.apply(tiny_llama(), SPEC, (ids(),), {"use_cache": False})
    randomize_lora(gm)
    return gm


def train(gm, batches_per_step, optimizer=None, steps=range(STEPS)):
    optimizer = optimizer or torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    for step in steps:
        gm(batches_per_step[step]).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def lora_weights(gm) -> dict:
    return {name: lora_fx.distributed.full(p.detach()).clone() for name, p in gm.named_parameters() if ".lora_" in name}


def worker(rank: int, folder: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    import torch.distributed.checkpoint as dcp

    torch.set_num_threads(1)                # two ranks on a small, busy machine: no oversubscribed thread pools
    folder = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{folder / 'store'}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(minutes=10))   # a file store: no port another process can take
    expected = torch.load(folder / "expected.pt")
    local = batches(rank)
    base = adapted_llama()

    ddp_model = copy.deepcopy(base)
    train(torch.nn.parallel.DistributedDataParallel(ddp_model), local)
    for name, value in lora_weights(ddp_model).items():
        torch.testing.assert_close(value, expected["trained"][name], rtol=1e-4, atol=1e-5, msg=f"DDP {name}")
    if rank == 1:
        with pytest.raises(AdapterError, match="rank 1 cannot save: on an unsharded model in a distributed run"):
            lora_fx.save_adapter(ddp_model, folder / "never")

    sharded = lora_fx.shard(copy.deepcopy(base))
    assert all(type(p).__name__ == "DTensor" for p in sharded.parameters())
    optimizer = train(sharded, local, steps=range(STEPS - 1))
    state = {name: value for name, value in get_state_dict(sharded, optimizer)[0].items() if ".lora_" in name}
    dcp.save({"model": state, "optimizer": get_state_dict(sharded, optimizer)[1]}, checkpoint_id=folder / "dcp")
    train(sharded, local, optimizer, steps=[STEPS - 1])
    for name, value in lora_weights(sharded).items():
        torch.testing.assert_close(value, expected["trained"][name], rtol=1e-4, atol=1e-5, msg=f"FSDP2 {name}")
    lora_fx.save_adapter(sharded, folder / "saved")                    # collective: rank 0 writes

    resumed = lora_fx.shard(copy.deepcopy(base))
    optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    train(resumed, local, optimizer, steps=[])                          # creates the optimizer state to load into
    model_state, optimizer_state = get_state_dict(resumed, optimizer)
    loaded = {"model": {k: v for k, v in model_state.items() if ".lora_" in k}, "optimizer": optimizer_state}
    dcp.load(loaded, checkpoint_id=folder / "dcp")
    set_state_dict(resumed, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"],
                   options=StateDictOptions(strict=False))
    train(resumed, local, optimizer, steps=[STEPS - 1])
    for name, value in lora_weights(resumed).items():
        torch.testing.assert_close(value, lora_weights(sharded)[name], rtol=0, atol=0, msg=f"resumed {name}")

    lora_fx.hotswap_adapter(sharded, folder / "peft", adapter="default")
    torch.testing.assert_close(sharded(expected["probe"]).logits, expected["swapped"], rtol=0, atol=1e-5)
    with pytest.raises(AdapterError, match=r"rank 8 > the slot's rank 4"):
        lora_fx.hotswap_adapter(sharded, folder / "too_big", adapter="default")
    with pytest.raises(AdapterError, match="apply cannot change a sharded model"):
        lora_fx.apply(sharded, LoraSpec(rank=2, adapter="late"))
    with pytest.raises(AdapterError, match="saving failed on rank 0: .*is not a directory"):
        lora_fx.save_adapter(sharded, folder / "expected.pt")             # rank 0 fails: every rank hears it
    dist.barrier()                          # no rank tears the group down while the other is still in a collective
    dist.destroy_process_group()


def peft_adapter(path: Path, rank: int) -> None:
    torch.manual_seed(0)
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=rank,
                                                                  lora_alpha=3))
    randomize_lora(reference, seed=5)
    reference.save_pretrained(str(path))


def test_ddp_and_fsdp2_train_save_swap_and_resume_like_one_process(tmp_path):
    single = adapted_llama()
    concatenated = [torch.cat([batches(rank)[step] for rank in range(WORLD)]) for step in range(STEPS)]
    train(single, concatenated)
    peft_adapter(tmp_path / "peft", rank=2)
    peft_adapter(tmp_path / "too_big", rank=8)
    probe = ids(3, 5, seed=9)
    swapped = copy.deepcopy(single)
    lora_fx.hotswap_adapter(swapped, tmp_path / "peft", adapter="default")
    torch.save({"trained": lora_weights(single), "probe": probe, "swapped": swapped(probe).logits.detach()},
               tmp_path / "expected.pt")

    mp.spawn(worker, args=(str(tmp_path),), nprocs=WORLD)

    lora_fx.save_adapter(single, tmp_path / "single")
    saved, alone = (lora_fx.load_adapter(copy.deepcopy(adapted_llama()), tmp_path / d, adapter="x")
                    for d in ("saved", "single"))
    for (name, value), (_, reference) in zip(lora_fx.adapter_weights(saved, "x").items(),
                                             lora_fx.adapter_weights(alone, "x").items()):
        torch.testing.assert_close(value[0], reference[0], rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(value[1], reference[1], rtol=1e-4, atol=1e-5, msg=name)
    lora_fx.set_active(saved, "x")
    torch.manual_seed(0)
    in_peft = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "saved"))
    torch.testing.assert_close(in_peft(input_ids=probe, use_cache=False).logits, saved(probe).logits, rtol=0,
                               atol=1e-5)
    assert not (tmp_path / "never").exists()


def test_sharding_needs_a_process_group():
    with pytest.raises(AdapterError, match="lora_fx.shard needs torch.distributed: call "
                                           "torch.distributed.init_process_group"):
        lora_fx.shard(adapted_llama())
