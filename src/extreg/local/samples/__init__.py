"""Sample extensions: reference behaviour of the Beamline extensions, served over NATS.

`normalize_text`, `pii_guard`, `mask_pii` and `test_provider` follow the reference
behaviour of the wire contract; `flaky` fails on demand (see `extreg.local.samples.flaky`) and
`echo` answers with the request unchanged. `SAMPLE_EXTENSIONS` lists their registry
records; `run_samples()` / `SampleRunner` serve them; `main()` backs
`extreg sample-extensions`.
"""

from ...errors import SampleRunnerError
from .extensions import FLAKY_CONTROL_SUBJECT, SAMPLE_EXTENSIONS, SAMPLES_BY_ID, SampleExtension
from .flaky import Flaky, FlakySettings
from .runner import SampleRunner, main, run_samples, serve_forever

__all__ = [
    "FLAKY_CONTROL_SUBJECT",
    "SAMPLES_BY_ID",
    "SAMPLE_EXTENSIONS",
    "Flaky",
    "FlakySettings",
    "SampleExtension",
    "SampleRunner",
    "SampleRunnerError",
    "main",
    "run_samples",
    "serve_forever",
]
