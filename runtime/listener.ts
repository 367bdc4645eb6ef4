/**
 * The server's listening socket: TCP (with TLS when a certificate is
 * given) or a Unix socket, as a reverse proxy on the same machine uses.
 */

import type { ServerOptions } from "./options.ts";

/** The server's listening address, as the log and the environ show it. */
export interface Endpoint {
  /** The address for the log line, such as "http://127.0.0.1:8000" or "unix:/run/site.sock". */
  url: string;
  /** SERVER_NAME of a request without a Host header. */
  hostname: string;
  /** SERVER_PORT, or undefined on a Unix socket, where it comes from the Host header or the scheme. */
  port: number | undefined;
  /** The scheme in `request.url`: "http", "https" or "http+unix". */
  urlScheme: string;
}

/** The other end of a connection: an address and port, or "" for a Unix socket. */
export interface Peer {
  address: string;
  port: number | undefined;
}

export type PeerHandler = (request: Request, peer: Peer) => Promise<Response>;

/** A TLS certificate or key that Deno cannot use, or a Unix socket path that cannot be used. */
export class ListenConfigError extends Error {}

/** Mode of the Unix socket: as on a loopback port, every local user may connect. */
const SOCKET_MODE = 0o666;

/**
 * Starts Deno's HTTP server on the socket the options name, and resolves
 * once it listens.
 *
 * @throws {ListenConfigError} The certificate and key do not fit, or the socket path is taken.
 */
export async function listen(
  options: Pick<ServerOptions, "host" | "port" | "tls" | "unixSocket">,
  handler: PeerHandler,
  onError: (error: unknown) => Response,
): Promise<{ server: Deno.HttpServer; endpoint: Endpoint }> {
  const { promise, resolve } = Promise.withResolvers<Endpoint>();
  if (options.unixSocket !== undefined) {
    const path = options.unixSocket;
    await removeStaleSocket(path);
    const server = Deno.serve({
      path,
      onListen: () => {
        Deno.chmodSync(path, SOCKET_MODE);
        resolve({
          url: `unix:${path}`,
          hostname: "localhost",
          port: undefined,
          urlScheme: "http+unix",
        });
      },
      onError,
    }, (request) => handler(request, { address: "", port: undefined }));
    return { server, endpoint: await promise };
  }

  const scheme = options.tls ? "https" : "http";
  const serveOptions: Deno.ServeTcpOptions & Partial<Deno.TlsCertifiedKeyPem> = {
    hostname: options.host,
    port: options.port,
    ...(options.tls ? { cert: options.tls.cert, key: options.tls.key } : {}),
    onListen: (addr) => {
      // An IPv6 address goes in brackets in a URL.
      const host = addr.hostname.includes(":") ? `[${addr.hostname}]` : addr.hostname;
      resolve({
        url: `${scheme}://${host}:${addr.port}`,
        hostname: addr.hostname,
        port: addr.port,
        urlScheme: scheme,
      });
    },
    onError,
  };
  const tcpHandler = (request: Request, info: Deno.ServeHandlerInfo<Deno.NetAddr>) =>
    handler(request, { address: info.remoteAddr.hostname, port: info.remoteAddr.port });
  let server: Deno.HttpServer;
  try {
    server = Deno.serve(serveOptions, tcpHandler);
  } catch (error) {
    if (!options.tls || error instanceof Deno.errors.AddrInUse) throw error;
    if (error instanceof Deno.errors.PermissionDenied) throw error;
    throw new ListenConfigError(
      `cannot use the certificate ${options.tls.certFile} with the key ` +
        `${options.tls.keyFile}: ${error instanceof Error ? error.message : error}; ` +
        "give the key that belongs to the certificate, both in PEM form",
    );
  }
  return { server, endpoint: await promise };
}

/**
 * Removes a socket file that a server which stopped without cleaning up
 * left behind, as gunicorn does. A socket that a live server listens on,
 * and any other kind of file, stays, and the start fails with its reason.
 */
async function removeStaleSocket(path: string): Promise<void> {
  let info: Deno.FileInfo;
  try {
    info = Deno.lstatSync(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return;
    throw error;
  }
  if (!info.isSocket) {
    throw new ListenConfigError(
      `cannot listen on the Unix socket ${path}: the path is taken by a file that is not ` +
        "a socket; remove it or give another path",
    );
  }
  try {
    // The connection only checks whether a server listens there.
    (await Deno.connect({ transport: "unix", path })).close();
  } catch (error) {
    if (!(error instanceof Deno.errors.ConnectionRefused)) throw error;
    Deno.removeSync(path);
    return;
  }
  throw new ListenConfigError(
    `cannot listen on the Unix socket ${path}: another server listens there; stop it or ` +
      "give another path",
  );
}
