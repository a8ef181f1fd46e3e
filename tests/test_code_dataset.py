"""Reading pretokenize's Parquet files on a busy cluster: a sweep trial on 2 cores holds its workers and a sliver
for its own process, so no whole CPU is ever free. Every task of `stages.datasets.code_dataset` runs at the
CPUs it is given (Ray Data's V2 Parquet reader adds a file-listing task that asks for a whole one)."""
import threading

import numpy as np
import pyarrow.parquet as pq
import ray
from ray.util.placement_group import placement_group, remove_placement_group

from pipeline.data.codes import CodesMeta, codes_table
from stages.datasets import code_dataset


def test_code_files_read_while_no_whole_cpu_is_free(ray_cluster, tmp_path):
    meta = CodesMeta(grid=(2, 2), codebook_size=16, tokenizer_sha256="ab")
    paths = []
    folder = tmp_path / "trials" / "rq_depth=1_abc123" / "codes"  # a sweep trial's folder: not a partition key
    folder.mkdir(parents=True)
    for part in range(3):
        path = str(folder / f"part-{part}.parquet")
        codes = np.full((4, 2, 2), part)
        pq.write_table(codes_table([f"k{part}-{i}" for i in range(4)], [part] * 4, [0] * 4, codes, meta), path)
        paths.append(path)
    # As in the Transformer stage: the dataset is made first, then the trial's workers and process take all but
    # 0.4 of the 2 CPUs, then the workers read it.
    dataset = code_dataset(paths, 0.25)
    busy = placement_group([{"CPU": 1.6}])
    ray.get(busy.ready(), timeout=60)
    rows: list = []
    try:
        reader = threading.Thread(target=lambda: rows.extend(dataset.take_all()), daemon=True)
        reader.start()
        reader.join(timeout=120)
        assert not reader.is_alive(), "reading the code files waited for a CPU that is never free"
    finally:
        remove_placement_group(busy)
    assert all(set(row) == {"key", "label", "view", "codes"} for row in rows)
    assert sorted(row["key"] for row in rows) == sorted(f"k{p}-{i}" for p in range(3) for i in range(4))
    assert all(list(row["codes"]) == [int(row["label"])] * 4 for row in rows)
    assert ray.data.DataContext.get_current().use_datasource_v2  # the global setting is left as it was
