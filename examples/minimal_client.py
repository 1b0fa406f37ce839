"""A SplitWave client in ~50 lines: generated stubs + numpy, no SplitWave code, no torch, no ONNX.

It follows protos/splitwave.proto alone: joins as backend "custom" speaking only the "raw" codec, asks for the
open round, streams its own cut-layer activations `h` ([batch, seq, hidden], hidden from the manifest, seq
shorter than max_seq_len) for a few steps without waiting for each reply, half-closes the stream, and prints
the loss and the gradient it gets back. Its steps are padded; the server also takes packed ones (only the
real-token rows of h, plus "row_lengths"; see TrainRequest in the .proto), which save bytes on padded batches.
Usage: python examples/minimal_client.py HOST:PORT [STEPS]
"""

import json
import sys
from collections.abc import Iterator

import grpc
import numpy as np

from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos import splitwave_pb2_grpc as rpc


def frames(
    name: str, a: np.ndarray, chunk: int = 1 << 19
) -> Iterator[pb.TensorFrame]:  # "raw": little-endian bytes, cut so each frame stays under 1 MiB
    data = a.astype(a.dtype.newbyteorder("<")).tobytes()
    parts = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]
    for i, part in enumerate(parts):
        yield pb.TensorFrame(
            name=name,
            dtype=str(a.dtype),
            shape=a.shape,
            codec="raw",
            frame_index=i,
            frame_count=len(parts),
            payload=part,
        )


def main(target: str, steps: int = 3) -> None:
    stub = rpc.SplitWaveStub(grpc.insecure_channel(target))
    caps = pb.Capabilities(protocol_version=1, backend="custom", codecs=["raw"])
    me = stub.Join(pb.JoinRequest(client_name="example", capabilities=caps))
    hidden = json.loads(me.manifest_json)["hidden_size"]
    hdr = lambda r, s=0: pb.Header(session_token=me.session_token, run_id=me.run_id, round=r, step=s)
    rnd = [m for m in stub.AwaitRound(pb.RoundRequest(header=hdr(me.current_round), no_wait=True))][-1]
    r, b, n = rnd.directives.next_round, me.config.batch_size, min(8, me.config.max_seq_len)
    rng = np.random.default_rng(0)

    def requests():  # returning ends the iterator: gRPC then half-closes the stream
        for s in range(steps):
            h = rng.standard_normal((b, n, hidden), dtype=np.float32)
            for name, a in (
                ("h", h),
                ("attention_mask", np.ones((b, n), np.int64)),
                ("labels", rng.integers(0, 2, b).astype(np.int64)),
            ):
                yield from (pb.TrainRequest(header=hdr(r, s), frame=f) for f in frames(name, a))
            yield pb.TrainRequest(header=hdr(r, s), end_step=pb.StepEnd(batch_size=b))

    buf = b""
    for reply in stub.Train(requests()):
        if reply.WhichOneof("body") == "frame":
            f = reply.frame
            assert f.codec == "raw", f.codec  # we declared only "raw"
            buf += f.payload
            if f.frame_index + 1 == f.frame_count:
                grad, buf = np.frombuffer(buf, np.dtype(f.dtype).newbyteorder("<")).reshape(f.shape), b""
        else:
            print(f"step {reply.header.step}: loss {reply.end_step.loss:.4f}, |grad_h| {np.linalg.norm(grad):.3e}")
    stub.Leave(pb.LeaveRequest(header=hdr(r), reason="example done"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
