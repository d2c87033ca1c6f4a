"""Redis storage of user states, applied Kafka offsets and the item index, under one key prefix.

Keys, where ``{prefix}`` contains only letters, digits, ``_``, ``.`` and ``-``
so that the first ``:`` ends it and two prefixes never share a key:

``{prefix}:user:{user_id}``
    String: the user's state blob (see ``streamer.state_codec``).
``{prefix}:item:index``
    Hash: item id -> dense item index (decimal).
``{prefix}:item:ids``
    Hash: dense item index (decimal) -> item id.
``{prefix}:item:next``
    String counter: the next item index to allocate, which is also the number
    of items allocated so far.
``{prefix}:offsets:{topic}``
    Hash: partition (decimal) -> offset of the last event applied to the states.
``{prefix}:users:count``
    String counter: the number of users whose first event was stored.
``{prefix}:epoch``
    String: a random id written once; if it disappears, Redis lost its data.
``{prefix}:layout``
    String "h,K": the state layout of the prefix, checked at start.

User ids, item ids and topic names are stored as UTF-8.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import redis

from drnn_core.errors import ConfigError, DrnnError
from drnn_core.state import UserStateBatch
from streamer.state_codec import decode_states, encode_states, state_blob_problem, state_size_bytes

__all__ = ["RedisStore", "StoreArgumentError", "StoreError"]

logger = logging.getLogger(__name__)

PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_.\-]+")
MAX_ITEM_INDEX = np.iinfo(np.int32).max
SCAN_CHUNK = 1000

# KEYS: index hash (id -> index), ids hash (index -> id), next-index counter.
# ARGV: the lowest next index this process accepts (one past the largest index it
# knows, so that a Redis that lost data never hands out a known index again), then
# item ids, each distinct. Returns the index of every id, in order. Redis runs a
# script atomically, so concurrent callers cannot allocate one id twice.
_ALLOCATE_ITEMS_LUA = """
local floor = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[3]) or '0')
if current < floor then
    redis.call('SET', KEYS[3], floor)
end
local indexes = {}
for i = 2, #ARGV do
    local item_id = ARGV[i]
    local index = redis.call('HGET', KEYS[1], item_id)
    if index then
        indexes[i - 1] = tonumber(index)
    else
        local allocated = redis.call('INCR', KEYS[3]) - 1
        local field = string.format('%d', allocated)
        redis.call('HSET', KEYS[1], item_id, field)
        redis.call('HSET', KEYS[2], field, item_id)
        indexes[i - 1] = allocated
    end
end
return indexes
"""

# KEYS: index hash (id -> index), ids hash (index -> id), next-index counter.
# ARGV: pairs of item id and index known to this process. Puts back the pairs that
# Redis lost (it keeps any id or index it still holds) and raises the counter past
# them, so that Redis and this process agree again after Redis lost data.
_RESTORE_ITEMS_LUA = """
local highest = -1
for i = 1, #ARGV, 2 do
    local index = tonumber(ARGV[i + 1])
    if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
        redis.call('HSETNX', KEYS[2], ARGV[i + 1], ARGV[i])
    end
    if index > highest then
        highest = index
    end
end
local current = tonumber(redis.call('GET', KEYS[3]) or '0')
if current < highest + 1 then
    redis.call('SET', KEYS[3], highest + 1)
end
return highest + 1
"""


# KEYS: offsets hash, epoch, user counter, then one key per user state.
# ARGV: epoch, partition count P, P triples (partition, expected stored offset or "",
# new offset), new-user count, then per user (blob, "1" to overwrite a corrupt state).
# The script checks the epoch and every expected offset before it writes anything,
# so a rejected batch changes nothing. A state whose event count (i64 at byte 10 of
# the blob) is not greater than the stored one is skipped, never written, and an
# applied offset never moves back. The counts are compared when the stored blob has
# the magic, version, h and K (bytes 0-2 and 4-7) of the new blob and a length that
# fits h and K as float32 or float16. The dtype code (byte 3) may differ, so stale
# writes are still skipped while workers switch state_dtype.
_COMMIT_BATCH_LUA = """
local epoch = redis.call('GET', KEYS[2])
if epoch ~= ARGV[1] then
    return {'epoch_missing', '', epoch or ''}
end
local partitions = tonumber(ARGV[2])
local position = 3
for i = 1, partitions do
    local stored = redis.call('HGET', KEYS[1], ARGV[position]) or ''
    if stored ~= ARGV[position + 1] then
        return {'offsets_mismatch', ARGV[position], stored}
    end
    position = position + 3
end
local new_users = tonumber(ARGV[position])
position = position + 1
local stale = 0
for k = 4, #KEYS do
    local blob = ARGV[position]
    local write = true
    if ARGV[position + 1] ~= '1' then
        local old = redis.call('GET', KEYS[k])
        local h, window = struct.unpack('<HH', blob, 5)
        local old_length = old and string.len(old) or 0
        if old and (old_length == 30 + 8 * h + 4 * window or old_length == 30 + 4 * h + 4 * window)
                and string.sub(old, 1, 3) == string.sub(blob, 1, 3)
                and string.sub(old, 5, 8) == string.sub(blob, 5, 8) then
            if struct.unpack('<i8', blob, 11) <= struct.unpack('<i8', old, 11) then
                write = false
            end
        end
    end
    if write then
        redis.call('SET', KEYS[k], blob)
    else
        stale = stale + 1
    end
    position = position + 2
end
position = 3
for i = 1, partitions do
    if ARGV[position + 1] == '' or tonumber(ARGV[position + 2]) > tonumber(ARGV[position + 1]) then
        redis.call('HSET', KEYS[1], ARGV[position], ARGV[position + 2])
    end
    position = position + 3
end
local users = ''
if new_users > 0 then
    users = tostring(redis.call('INCRBY', KEYS[3], new_users))
end
return {'ok', tostring(stale), users}
"""

COMMIT_OK = "ok"
COMMIT_EPOCH_MISSING = "epoch_missing"
COMMIT_OFFSETS_MISMATCH = "offsets_mismatch"


@dataclasses.dataclass(frozen=True)
class CommitResult:
    """Outcome of ``RedisStore.commit_batch``.

    Attributes
    ----------
    status : str
        COMMIT_OK, COMMIT_EPOCH_MISSING (Redis lost the epoch key, so its data)
        or COMMIT_OFFSETS_MISMATCH (a partition's stored offset differs from the
        expected one); only COMMIT_OK wrote anything.
    stale_states : int
        States skipped because the stored one had as many events or more.
    known_users : int or None
        The user counter after the increment, when there were new users.
    partition : int or None
        With COMMIT_OFFSETS_MISMATCH, the first partition that differed.
    stored_offset : int or None
        With COMMIT_OFFSETS_MISMATCH, the offset Redis holds for it (None if none).
    """

    status: str
    stale_states: int = 0
    known_users: int | None = None
    partition: int | None = None
    stored_offset: int | None = None


class StoreError(DrnnError):
    """A Redis command of the store failed; the original redis-py error is the ``__cause__``."""


class StoreArgumentError(DrnnError, ValueError):
    """A store method got arguments that do not fit together, such as ids and batch rows."""


class RedisStore:
    """User states, applied offsets and the item index of one model in Redis.

    Parameters
    ----------
    client : redis.Redis
        A client created with ``decode_responses=False``. It is used as given and
        may be shared with other threads.
    prefix : str
        Key prefix of this model: letters, digits, ``_``, ``.`` and ``-``.
    hidden_size, window : int
        h and K of the stored states. Blobs with another h or K load as corrupt.
    state_dtype : {"float32", "float16"}
        Float type of the hidden states in the blobs this store writes. Loading
        accepts blobs of both types.
    """

    def __init__(
        self, client: redis.Redis, *, prefix: str, hidden_size: int, window: int, state_dtype: str = "float32"
    ):
        if not isinstance(prefix, str) or not PREFIX_PATTERN.fullmatch(prefix):
            raise ConfigError(
                f"Invalid key prefix {prefix!r}: use one or more letters, digits, '_', '.' or '-', "
                "so that it cannot overlap another prefix"
            )
        state_size_bytes(hidden_size, window, state_dtype)

        self.client = client
        self.prefix = prefix
        self.hidden_size = hidden_size
        self.window = window
        self.state_dtype = state_dtype
        self._index_key = f"{prefix}:item:index".encode()
        self._ids_key = f"{prefix}:item:ids".encode()
        self._next_key = f"{prefix}:item:next".encode()
        self._user_key_prefix = f"{prefix}:user:".encode()
        self._users_key = f"{prefix}:users:count".encode()
        self._epoch_key = f"{prefix}:epoch".encode()
        self._commit_script = client.register_script(_COMMIT_BATCH_LUA)
        self._allocate_script = client.register_script(_ALLOCATE_ITEMS_LUA)
        self._restore_script = client.register_script(_RESTORE_ITEMS_LUA)
        self._index_of_item: dict[str, int] = {}
        self._item_of_index: dict[int, str] = {}

    def user_key(self, user_id: str) -> bytes:
        """Return the Redis key of a user's state."""
        return self._user_key_prefix + user_id.encode()

    def offsets_key(self, topic: str) -> bytes:
        """Return the Redis key of the applied offsets of ``topic``."""
        return f"{self.prefix}:offsets:{topic}".encode()

    def ping(self) -> None:
        """Send PING, raising StoreError if the server does not reply."""
        with self._redis_errors("ping Redis"):
            self.client.ping()

    def load_states(self, user_ids: Sequence[str]) -> tuple[UserStateBatch, list[str]]:
        """Load the states of ``user_ids`` with one MGET.

        Returns
        -------
        batch : UserStateBatch
            One row per entry of ``user_ids``, in that order. Unknown users and
            users with a corrupt blob get new-user rows.
        corrupt_ids : list of str
            Users whose stored blob was corrupt, in the order of ``user_ids``.
        """
        if not user_ids:
            return UserStateBatch.empty(0, self.hidden_size, self.window), []

        keys = [self.user_key(user_id) for user_id in user_ids]
        with self._redis_errors(f"load the states of {len(keys)} users"):
            blobs = self.client.mget(keys)

        batch, corrupt = decode_states(blobs, self.hidden_size, self.window)
        corrupt_ids = [user_ids[row] for row in np.flatnonzero(corrupt)]
        if corrupt_ids:
            self._log_corrupt(corrupt_ids, blobs[int(np.flatnonzero(corrupt)[0])])
        return batch, corrupt_ids

    def _log_corrupt(self, corrupt_ids: list[str], first_blob: bytes) -> None:
        logger.error(
            "Reset %d corrupt user states under prefix %r to new users (first ids %s). "
            "The first is invalid: %s",
            len(corrupt_ids),
            self.prefix,
            corrupt_ids[:5],
            state_blob_problem(first_blob, self.hidden_size, self.window),
        )

    def save_states(
        self,
        user_ids: Sequence[str],
        batch: UserStateBatch,
        *,
        topic: str,
        offsets: Mapping[int, int],
        new_users: int = 0,
    ) -> int | None:
        """Save user states and the offsets they include in one MULTI/EXEC transaction.

        Parameters
        ----------
        user_ids : sequence of str, length S
            The user of each row of ``batch``. If an id repeats, its last row is stored.
        batch : UserStateBatch
            S states to store.
        topic : str
            The Kafka topic the applied events came from.
        offsets : mapping of int to int
            Partition -> offset of the last event applied in this batch. These
            fields of the topic's offsets hash are overwritten, and other
            partitions keep their values.
        new_users : int
            Users of this batch stored for the first time; added to the user
            counter in the same transaction.

        Returns
        -------
        int or None
            The user counter after the increment, or None when ``new_users`` is 0.

        Redis runs the transaction atomically, so a crash or a lost connection
        leaves either all of its writes or none. Redis does not roll back a
        transaction in which one command fails, such as an HSET on a key of
        another type. The other writes then stay and StoreError is raised.
        """
        if len(user_ids) != batch.size:
            raise StoreArgumentError(
                f"Cannot save states: got {len(user_ids)} user ids for {batch.size} batch rows"
            )

        blobs = encode_states(batch, state_dtype=self.state_dtype)
        states = {self.user_key(user_id): blob for user_id, blob in zip(user_ids, blobs)}
        applied = {str(int(partition)): str(int(offset)) for partition, offset in offsets.items()}
        if not states and not applied:
            return None

        action = f"save the states of {len(states)} users and {len(applied)} offsets of topic {topic!r}"
        with self._redis_errors(action):
            pipeline = self.client.pipeline(transaction=True)
            if states:
                pipeline.mset(states)
            if applied:
                pipeline.hset(self.offsets_key(topic), mapping=applied)
            if new_users:
                pipeline.incrby(self._users_key, new_users)
            results = pipeline.execute()
        return int(results[-1]) if new_users else None

    def check_layout(self) -> None:
        """Record h and K under ``{prefix}:layout`` on first use, and raise if they differ later.

        Raises
        ------
        ConfigError
            If the prefix holds states of another hidden size or window, which
            would all be reset as corrupt.
        """
        layout = f"{self.hidden_size},{self.window}"
        key = f"{self.prefix}:layout".encode()
        with self._redis_errors("read or record the state layout"):
            self.client.set(key, layout, nx=True)
            stored = self.client.get(key).decode()
        if stored != layout:
            size, window = stored.split(",")
            raise ConfigError(
                f"Redis prefix {self.prefix!r} contains states with hidden_size={size} and window={window}, "
                f"but the settings ask for hidden_size={self.hidden_size} and window={self.window}. "
                "Use the stored values, or another key_prefix for a new model."
            )

    def ensure_epoch(self) -> str:
        """Return the epoch id of the prefix, creating a random one if it is missing."""
        with self._redis_errors("read or create the epoch key"):
            self.client.set(self._epoch_key, uuid.uuid4().hex, nx=True)
            value = self.client.get(self._epoch_key)
        return value.decode()

    def commit_batch(
        self,
        user_ids: Sequence[str],
        batch: UserStateBatch,
        *,
        topic: str,
        epoch: str,
        expected_offsets: Mapping[int, int | None],
        offsets: Mapping[int, int],
        forced_users: Sequence[str] = (),
        new_users: int = 0,
    ) -> CommitResult:
        """Write a batch's states and applied offsets atomically, fenced by epoch and offsets.

        One Lua script checks that the epoch key still holds ``epoch`` and that
        each partition of ``offsets`` still holds its ``expected_offsets`` value
        (None: no offset stored). Only then does it write the states, skipping
        each state whose event count is not greater than the stored one (unless
        the user is in ``forced_users``, whose stored state was corrupt), set the
        new offsets and add ``new_users`` to the user counter.

        Raises
        ------
        StoreError
            If Redis fails; nothing or everything was written, because Redis runs
            a script atomically.
        """
        if len(user_ids) != batch.size:
            raise StoreArgumentError(
                f"Cannot commit states: got {len(user_ids)} user ids for {batch.size} batch rows"
            )

        forced = set(forced_users)
        args: list = [epoch, len(offsets)]
        for partition, offset in offsets.items():
            expected = expected_offsets.get(partition)
            args += [str(int(partition)), "" if expected is None else str(int(expected)), str(int(offset))]
        args.append(int(new_users))
        for user_id, blob in zip(user_ids, encode_states(batch, state_dtype=self.state_dtype)):
            args += [blob, "1" if user_id in forced else "0"]
        keys = [self.offsets_key(topic), self._epoch_key, self._users_key]
        keys += [self.user_key(user_id) for user_id in user_ids]

        action = f"commit the states of {len(user_ids)} users and {len(offsets)} offsets of topic {topic!r}"
        with self._redis_errors(action):
            status, first, second = (part.decode() for part in self._commit_script(keys=keys, args=args))
        if status == COMMIT_OK:
            return CommitResult(COMMIT_OK, stale_states=int(first), known_users=int(second) if second else None)
        if status == COMMIT_OFFSETS_MISMATCH:
            return CommitResult(status, partition=int(first), stored_offset=int(second) if second else None)
        return CommitResult(status)

    def user_count(self) -> int:
        """Return the number of users stored under the prefix, from the counter save_states keeps."""
        with self._redis_errors("read the user count"):
            value = self.client.get(self._users_key)
        return int(value) if value is not None else 0

    def load_offsets(self, topic: str) -> dict[int, int]:
        """Return partition -> offset of the last applied event of ``topic``; empty if none was saved."""
        key = self.offsets_key(topic)
        with self._redis_errors(f"load the applied offsets of topic {topic!r}"):
            fields = self.client.hgetall(key)

        try:
            return {int(partition): int(offset) for partition, offset in fields.items()}
        except ValueError as error:
            raise StoreError(
                f"Invalid applied offsets in hash {key.decode()!r}: {fields!r} has a field or value "
                "that is not an integer; delete the hash to replay the topic from its committed offsets"
            ) from error

    def allocate_items(self, item_ids: Sequence[str]) -> np.ndarray:
        """Return the dense index of each item id, allocating the next free index to new ids.

        Ids missing from the local cache go, de-duplicated, to one Lua script call,
        which Redis runs atomically. All processes sharing the prefix therefore
        get the same index for an id, and an index never changes once allocated.

        Returns
        -------
        ndarray, shape (len(item_ids),), int32
            The indexes in the order of ``item_ids``.
        """
        unknown = list(dict.fromkeys(item_id for item_id in item_ids if item_id not in self._index_of_item))
        if unknown:
            self._allocate_unknown(unknown)

        return np.fromiter(
            (self._index_of_item[item_id] for item_id in item_ids),
            dtype=np.int32,
            count=len(item_ids),
        )

    def _allocate_unknown(self, item_ids: list[str]) -> None:
        with self._redis_errors(f"allocate indexes for {len(item_ids)} items"):
            indexes = self._allocate_script(
                keys=[self._index_key, self._ids_key, self._next_key],
                args=[self._next_index_floor()] + [item_id.encode() for item_id in item_ids],
            )

        if indexes and max(indexes) > MAX_ITEM_INDEX:
            raise StoreError(
                f"Item index {max(indexes)} under prefix {self.prefix!r} does not fit in int32; "
                "the prefix holds more than 2**31 items, so start a new prefix"
            )
        for item_id, index in zip(item_ids, indexes):
            self._index_of_item[item_id] = index
            self._item_of_index[index] = item_id

    def _next_index_floor(self) -> int:
        return max(self._item_of_index, default=-1) + 1

    def restore_items(self) -> int:
        """Write the item indexes cached by this process back to Redis, after Redis lost data.

        Ids and indexes Redis still holds are kept; the counter rises past every
        known index. Returns the counter afterwards.
        """
        pairs: list = []
        for item_id, index in self._index_of_item.items():
            pairs += [item_id.encode(), str(index)]
        if not pairs:
            return self.item_count()
        with self._redis_errors(f"restore the indexes of {len(pairs) // 2} items"):
            return int(self._restore_script(keys=[self._index_key, self._ids_key, self._next_key], args=pairs))

    def item_count(self) -> int:
        """Return the number of item indexes allocated under the prefix."""
        with self._redis_errors("read the item count"):
            value = self.client.get(self._next_key)
        return int(value) if value is not None else 0

    def item_ids_of(self, indexes: Sequence[int]) -> list[str | None]:
        """Return the item id of each index, or None where no item has that index."""
        indexes = [int(index) for index in indexes]
        missing = list(dict.fromkeys(index for index in indexes if index not in self._item_of_index))
        if missing:
            with self._redis_errors(f"read the ids of {len(missing)} item indexes"):
                found = self.client.hmget(self._ids_key, [str(index) for index in missing])
            for index, item_id in zip(missing, found):
                if item_id is not None:
                    self._item_of_index[index] = item_id.decode()
                    self._index_of_item[item_id.decode()] = index

        return [self._item_of_index.get(index) for index in indexes]

    def iter_user_states(self, batch_size: int = 500) -> Iterator[tuple[str, int, int, int]]:
        """Yield (user_id, count, last_partition, last_offset) of every stored user.

        Keys are listed with SCAN and read with one MGET per ``batch_size`` keys,
        so users saved or deleted during the iteration may or may not appear.
        Corrupt states are skipped with a warning. Each user is yielded once,
        because the ids already yielded are kept in memory.
        """
        if batch_size < 1:
            raise StoreArgumentError(f"Invalid batch_size={batch_size}: expected 1 or more")

        seen: set[bytes] = set()
        pending: list[bytes] = []
        with self._redis_errors("scan the user states"):
            for key in self.client.scan_iter(match=self._user_key_prefix + b"*", count=batch_size):
                if key in seen:
                    continue
                seen.add(key)
                pending.append(key)
                if len(pending) >= batch_size:
                    yield from self._read_summaries(pending)
                    pending = []

            if pending:
                yield from self._read_summaries(pending)

    def _read_summaries(self, keys: list[bytes]) -> Iterator[tuple[str, int, int, int]]:
        blobs = self.client.mget(keys)
        batch, corrupt = decode_states(blobs, self.hidden_size, self.window)
        if corrupt.any():
            logger.warning(
                "Skipped %d corrupt user states under prefix %r while scanning",
                int(corrupt.sum()),
                self.prefix,
            )

        start = len(self._user_key_prefix)
        for row, key in enumerate(keys):
            if blobs[row] is None or corrupt[row]:
                continue
            yield (
                key[start:].decode(errors="replace"),
                int(batch.count[row]),
                int(batch.last_partition[row]),
                int(batch.last_offset[row]),
            )

    def clear(self) -> int:
        """Delete every key under the prefix with SCAN and UNLINK, and return how many were deleted.

        The local item cache is emptied too. Other RedisStore instances on the
        same prefix keep their caches, so use this only when no other instance
        is running, as in tests and demos.
        """
        deleted = 0
        with self._redis_errors("delete the keys"):
            batch: list[bytes] = []
            for key in self.client.scan_iter(match=f"{self.prefix}:*".encode(), count=SCAN_CHUNK):
                batch.append(key)
                if len(batch) >= SCAN_CHUNK:
                    deleted += self.client.unlink(*batch)
                    batch = []
            if batch:
                deleted += self.client.unlink(*batch)

        self._index_of_item.clear()
        self._item_of_index.clear()
        logger.info("Deleted %d keys under prefix %r", deleted, self.prefix)
        return deleted

    @contextlib.contextmanager
    def _redis_errors(self, action: str) -> Iterator[None]:
        """Turn a redis-py error raised inside the block into a StoreError that names ``action``."""
        try:
            yield
        except redis.exceptions.RedisError as error:
            raise StoreError(
                f"Failed to {action} under key prefix {self.prefix!r} at Redis "
                f"{_server_address(self.client)}: {type(error).__name__}: {error}. {_fix_for(error)}"
            ) from error


def _server_address(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def _fix_for(error: redis.exceptions.RedisError) -> str:
    if isinstance(error, redis.exceptions.AuthenticationError):
        return "Check the password in the Redis URL."
    if isinstance(error, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return "Check that the Redis server is running and reachable at that address."
    if isinstance(error, redis.exceptions.ResponseError):
        return (
            "Another program may have written a key of another type under the prefix; "
            "use a prefix that only drnn-stream writes to."
        )
    return "Check the Redis server log for the cause."
