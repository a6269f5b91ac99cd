from typing import final

@final
class Fetch:
    def forward(self, partitions: list[int], /) -> None: ...
    def poll(
        self, max_records: int, timeout_ms: int, /
    ) -> tuple[
        dict[int, tuple[list[int], list[bytes | None], list[bytes | None]]],
        list[tuple[int, int, str]],
        int,
    ]: ...
    def close(self, partitions: list[int], /) -> None: ...

def bind(consumer: object, library_path: str, topic: str, name_prefix: str, /) -> Fetch: ...
