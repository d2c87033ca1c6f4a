"""The drnn-stream command line: worker, replay, demo, evaluate, report, serve and recommend."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from kafka.errors import KafkaError

from drnn_core.errors import DrnnError
from streamer.datasets import FORMATS, Message, read_interactions, read_messages
from streamer.events import encode_event
from streamer.evaluate import add_evaluate_command
from streamer.report import add_report_command
from streamer.serve import add_recommend_command, add_serve_command
from streamer.settings import Settings, add_arguments, load_settings, unknown_environment_variables

logger = logging.getLogger("streamer.cli")

KAFKA_SETTINGS = ("bootstrap_servers", "topic", "client_id")


def main(argv: list[str] | None = None) -> int:
    """Run the command named in ``argv`` and return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args)
    except DrnnError as exc:
        parser.error(str(exc))
    configure_logging(settings.log_level)
    for name in unknown_environment_variables():
        logger.warning("Ignoring unknown environment variable %s: no setting has that name (see --help)", name)
    try:
        return args.run(settings, args)
    except DrnnError as exc:
        logger.error("%s", exc)
        return 1
    except KafkaError as exc:
        logger.error(
            "Failed to reach Kafka at %s: %r. Check bootstrap_servers (--bootstrap-servers / "
            "DRNN_BOOTSTRAP_SERVERS) and that the broker is up.", settings.bootstrap_servers, exc,
        )
        return 1
    except KeyboardInterrupt:
        logger.warning("Interrupted a second time: stopped without finishing the batch in hand")
        return 130


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one sub-command per mode."""
    parser = argparse.ArgumentParser(
        prog="drnn-stream",
        description="Streaming online learner for sequential recommendation (recurrent BPR on Kafka and Redis).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="Run the long-running consumer that trains on the topic.")
    add_arguments(worker)
    worker.set_defaults(run=run_worker)

    replay = commands.add_parser("replay", help="Produce a dataset file into the topic in timestamp order.")
    _add_dataset_arguments(replay, required=True)
    add_arguments(replay, KAFKA_SETTINGS + ("log_level",))
    replay.set_defaults(run=run_replay)

    demo = commands.add_parser(
        "demo", help="Start a local broker and Redis, replay a dataset, train until it is consumed, print a summary."
    )
    _add_dataset_arguments(demo, required=False)
    demo.add_argument("--partitions", type=_positive_int, default=4, help="Partitions of the demo topic. Default: 4.")
    demo.add_argument("--summary-json", metavar="FILE", help="Also write the summary as a JSON object to FILE.")
    add_arguments(demo)
    demo.set_defaults(run=run_demo_command)

    add_evaluate_command(commands)
    add_report_command(commands)
    add_serve_command(commands)
    add_recommend_command(commands)
    return parser


def _add_dataset_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--dataset", metavar="PATH", required=required,
        help="Dataset file." + ("" if required else " Default: a generated stream of 20,000 events."),
    )
    parser.add_argument("--format", dest="fmt", choices=FORMATS, help="Format of the dataset file; required with --dataset.")
    parser.add_argument(
        "--speed", type=_non_negative_float, default=0.0,
        help="0 sends as fast as possible; S > 0 divides the gaps between event times by S. Default: 0.",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="Hide the progress bars.")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer >= 1")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a finite number >= 0")
    return value


def configure_logging(level: str) -> None:
    """Log to stderr at ``level``; kafka-python's own INFO chatter is shown only at DEBUG."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":
        logging.getLogger("kafka").setLevel(logging.WARNING)
        # Warns about its own event loop whenever a send or poll takes over 100 ms, which a
        # Numba batch on the other thread makes routine; real failures still log at ERROR.
        logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)


def install_signal_handlers(stop) -> None:
    """Make the first SIGINT or SIGTERM call ``stop()`` and the second raise KeyboardInterrupt."""
    received = []

    def handle(signum, frame) -> None:
        received.append(signum)
        if len(received) > 1:
            raise KeyboardInterrupt
        logger.info("Received %s: finishing the batch in hand (send it again to stop at once)", signal.Signals(signum).name)
        stop()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


def run_worker(settings: Settings, args: argparse.Namespace) -> int:
    """Run the worker until a signal or the idle timeout stops it."""
    from streamer.app import build_worker

    worker = build_worker(settings)
    install_signal_handlers(worker.request_stop)
    worker.run()
    if worker.checkpoint_failed:
        logger.error("Stopped without a final checkpoint: the model learned since the last one is lost")
        return 1
    return 0


def run_replay(settings: Settings, args: argparse.Namespace) -> int:
    """Send a dataset file into the topic."""
    from streamer.kafka_io import make_producer
    from streamer.replay import replay_messages

    _require_format(args)
    if args.fmt == "jsonl":
        messages, timestamps = read_messages(args.dataset, args.fmt), None
    else:
        interactions = read_interactions(args.dataset, args.fmt)
        messages = [Message(*encode_event(i.user_id, i.item_id, i.ts)) for i in interactions]
        timestamps = [i.ts for i in interactions]
    if args.speed > 0 and timestamps is None:
        raise DrnnError("--speed needs event times, which --format jsonl does not provide; drop --speed")

    producer = make_producer(settings, linger_ms=20, batch_size=256 * 1024)
    try:
        sent = replay_messages(
            producer, settings.topic, messages, timestamps=timestamps, speed=args.speed, progress=args.progress
        )
    finally:
        producer.close()
    print(f"sent {sent} messages to {settings.topic}")
    return 0


def run_demo_command(settings: Settings, args: argparse.Namespace) -> int:
    """Run the embedded demo and print its summary."""
    from streamer.demo import run_demo

    if args.dataset is not None:
        _require_format(args)
    if args.speed > 0 and args.fmt == "jsonl":
        raise DrnnError("--speed needs event times, which --format jsonl does not provide; drop --speed")
    summary = run_demo(
        settings,
        dataset=args.dataset,
        fmt=args.fmt,
        speed=args.speed,
        partitions=args.partitions,
        summary_json=args.summary_json,
        progress=args.progress,
        on_worker=lambda worker: install_signal_handlers(worker.request_stop),
    )
    print(summary.as_text())
    return 0 if summary.user_count_mismatches == 0 else 1


def _require_format(args: argparse.Namespace) -> None:
    if args.fmt is None:
        raise DrnnError(f"--dataset {args.dataset} needs --format, one of: {', '.join(FORMATS)}")


if __name__ == "__main__":
    sys.exit(main())
