"""TensorBoard event files: CRC-32C against its published check value, events decoded by the protobuf
library from the tensorflow.Event schema (declared here, independently of the writer)."""

import struct

import pytest

from experiments import tensorboard


def test_crc32c_check_value():
    assert tensorboard.crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value
    assert tensorboard.crc32c(b"") == 0


def _event_class():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FileDescriptorProto(name="idjax_test_event.proto", package="idjaxtest")
    F = descriptor_pb2.FieldDescriptorProto
    value = f.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
    summary = f.message_type.add(name="Summary")
    summary.field.add(name="value", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                      type_name=".idjaxtest.Value")
    event = f.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    event.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                    type_name=".idjaxtest.Summary")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("idjaxtest.Event"))


def _records(path):
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        (length_crc,) = struct.unpack_from("<I", data, pos + 8)
        payload = data[pos + 12: pos + 12 + length]
        (payload_crc,) = struct.unpack_from("<I", data, pos + 12 + length)
        assert length_crc == tensorboard._masked_crc(data[pos: pos + 8])
        assert payload_crc == tensorboard._masked_crc(payload)
        out.append(payload)
        pos += 16 + length
    return out


def test_scalars_round_trip_through_protobuf(tmp_path):
    pytest.importorskip("google.protobuf")
    event_cls = _event_class()
    tensorboard.write_scalars(tmp_path, {"kind": "train", "step": 25, "loss": 2.5, "lr": 1e-3, "tokens_per_s": None})
    tensorboard.write_scalars(tmp_path, {"kind": "eval", "step": 2**40, "loss": 1.25})
    files = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = [event_cls.FromString(r) for r in _records(files[0])]
    assert events[0].file_version == "brain.Event:2"
    assert events[1].step == 25
    assert {v.tag: v.simple_value for v in events[1].summary.value} == {"train/loss": 2.5,
                                                                       "train/lr": pytest.approx(1e-3)}
    assert events[2].step == 2**40 and events[2].summary.value[0].tag == "eval/loss"
    assert events[2].summary.value[0].simple_value == 1.25
