"""The TensorBoard event framing of eagan/train/tracking.py against TensorBoard's own writer and
reader."""
import io
import random

import pytest
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.tensorflow_stub import errors
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New, masked_crc32c
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard.summary import scalar

from eagan.train.tracking import EventFile, _masked_crc32c, tfrecord


def read_records(path) -> list[bytes]:
    """Every record of ``path`` through TensorBoard's reader, which checks both checksums."""
    reader, records = PyRecordReader_New(str(path)), []
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            return records
        records.append(reader.record())


def test_masked_crc32c_on_the_standard_check_input():
    # 0xE3069283 is CRC-32C's published check value (its CRC of "123456789"); TensorBoard
    # masks it.
    assert _masked_crc32c(b"123456789") == masked_crc32c(b"123456789")
    crc = 0xE3069283
    assert _masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) \
        & 0xFFFFFFFF


@pytest.mark.parametrize("size", [0, 1, 7, 4096, 100_003])
def test_tfrecord_frames_as_tensorboards_record_writer(size):
    data = random.Random(size).randbytes(size)
    buffer = io.BytesIO()
    RecordWriter(buffer).write(data)
    assert tfrecord(data) == buffer.getvalue()


def test_event_file_reads_back_through_tensorboards_checksummed_reader(tmp_path):
    events = EventFile(tmp_path, purge_step=0)
    events.add([scalar("Loss/G", 1.5), scalar("Loss/D", -0.25)], step=7)
    events.close()
    read = [Event.FromString(record) for record in read_records(events.path)]
    assert read[0].file_version == "brain.Event:2"
    logged = [(event.step, value.tag, value.simple_value) for event in read[2:]
              for value in event.summary.value]
    assert logged == [(7, "Loss/G", 1.5), (7, "Loss/D", -0.25)]


def test_tensorboards_reader_refuses_a_record_whose_checksum_is_one_bit_off(tmp_path):
    record = bytearray(tfrecord(Event(step=3).SerializeToString()))
    record[-1] ^= 1
    path = tmp_path / "events.out.tfevents.0"
    path.write_bytes(record)
    with pytest.raises(errors.DataLossError, match="failed event crc32 check"):
        read_records(path)
