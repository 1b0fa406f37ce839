"""A SplitWave client in ~40 lines: generated stubs + numpy, no SplitWave code, no torch, no ONNX.

It joins, asks for the open round, streams its own cut-layer activations `h` for a few steps (raw float32
frames, exactly as protos/splitwave.proto documents them) and prints the loss and the gradient it gets back.
Usage: python examples/minimal_client.py HOST:PORT [STEPS]
"""
import json
import sys

import grpc
import numpy as np

from protos import splitwave_pb2 as pb, splitwave_pb2_grpc as rpc


def frame(name, a):  # one tensor = one raw frame (fine below 1 MiB; bigger tensors are split in frames)
    return pb.TensorFrame(name=name, dtype=str(a.dtype), shape=a.shape, codec="raw", frame_count=1,
                          payload=a.astype(a.dtype.newbyteorder("<")).tobytes())


def main(target, steps=3):
    stub = rpc.SplitWaveStub(grpc.insecure_channel(target))
    me = stub.Join(pb.JoinRequest(client_name="example", capabilities=pb.Capabilities(protocol_version=1)))
    hidden = json.loads(me.manifest_json)["hidden_size"]
    hdr = lambda r, s=0: pb.Header(session_token=me.session_token, run_id=me.run_id, round=r, step=s)
    rnd = [m for m in stub.AwaitRound(pb.RoundRequest(header=hdr(me.current_round), no_wait=True))][-1]
    r, b, n = rnd.directives.next_round, me.config.batch_size, 8
    rng = np.random.default_rng(0)

    def requests():
        for s in range(steps):
            h = rng.standard_normal((b, n, hidden), dtype=np.float32)
            for name, a in (("h", h), ("attention_mask", np.ones((b, n), np.int64)),
                            ("labels", rng.integers(0, 2, b).astype(np.int64))):
                yield pb.TrainRequest(header=hdr(r, s), frame=frame(name, a))
            yield pb.TrainRequest(header=hdr(r, s), end_step=pb.StepEnd(batch_size=b))

    for reply in stub.Train(requests()):
        if reply.WhichOneof("body") == "frame":
            f = reply.frame
            grad = np.frombuffer(f.payload, np.dtype(f.dtype).newbyteorder("<")).reshape(f.shape)
        else:
            print(f"step {reply.header.step}: loss {reply.end_step.loss:.4f}, |grad_h| {np.linalg.norm(grad):.3e}")
    stub.Leave(pb.LeaveRequest(header=hdr(r), reason="example done"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
