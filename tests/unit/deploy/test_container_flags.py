"""Every command line the recipes start parses as its program's flags, with the cluster's own
values (8 GPUs a pod, /models/model, the Secret's paths): the images' default arguments, each
gateway's `shardgate serve` line, and each torchrun line with the shard's flags after it. The
integration tests run these lines; this checks the values they replace locally too."""

import argparse

import pytest
import torch.distributed.run
from manifests import DOCKERFILES, OVERLAYS, Local, containers, entrypoint, exec_form, only, pod_templates, render_overlay

from shardgate.proto.shard_config import ShardConfig
from shardgate.server.cli import add_arguments, config_from_args
from shardgate.server.config import GatewayConfig
from shardgate.shards.main import parse_args as parse_shard_args

DOWNWARD = {"OMP_NUM_THREADS": "4", "POD_NAME": "shardgate-0", "POD_NAMESPACE": "inference", "NODE_NAME": "node-a"}


def serve_config(words: list[str]) -> GatewayConfig:
    parser = argparse.ArgumentParser(prog="shardgate serve", exit_on_error=False)
    add_arguments(parser)
    return config_from_args(parser.parse_args(words))


@pytest.mark.parametrize("tag", sorted(DOCKERFILES))
def test_image_default_arguments_are_serve_flags(tag):
    assert entrypoint(DOCKERFILES[tag]) == ["shardgate", "serve"]
    config = serve_config(exec_form(DOCKERFILES[tag], "CMD"))
    assert (config.host, config.port, config.telemetry.metrics_port) == ("0.0.0.0", 50051, 9464)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_container_lines_parse(overlay):
    docs = render_overlay(overlay)
    injected = {}
    if overlay == "multi-host":
        size = only(docs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["size"]
        injected = {"LWS_LEADER_ADDRESS": "shardgate-0.shardgate.inference", "LWS_GROUP_SIZE": str(size), "LWS_WORKER_INDEX": "0"}
    for where, template in pod_templates(docs).items():
        for container in containers(template["spec"]).values():
            argv, _ = Local(downward=DOWNWARD, injected=injected).command(container, ["shardgate", "serve"])
            words = argv[3:]  # after `python -m MODULE`
            if argv[2] == "shardgate.clients.cli":
                assert words[0] == "serve", where
                config = serve_config(words[1:])
                assert config.drain_timeout_s < template["spec"]["terminationGracePeriodSeconds"]
            else:
                assert argv[2] == "torch.distributed.run", where
                launch = torch.distributed.run.get_args_parser().parse_args(words)
                assert launch.module and launch.training_script == "shardgate.shards.main"
                shard = parse_shard_args(launch.training_script_args)
                assert isinstance(shard, ShardConfig)
                world = int(launch.nnodes) * int(launch.nproc_per_node)
                assert shard.replica.tp * shard.replica.pp == world, where  # torchrun's WORLD_SIZE
