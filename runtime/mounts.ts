/**
 * The server's mounts: which URL prefix runs which application, and whether
 * it runs embedded (isolates in this process) or in a daemon process group.
 *
 * Parsing checks how mounts and groups fit together. At start each mount
 * gets its backend. Each request goes to the mount with the longest prefix
 * that matches its path at a segment boundary.
 */

import {
  appReadPaths,
  type AppSpec,
  pinMountRoots,
  unreadablePathEntries,
} from "../supervisor/app_spec.ts";
import type { AppBackend } from "../supervisor/backend.ts";
import { DaemonGroup } from "../supervisor/daemon_group.ts";
import { type DaemonGroupSpec, groupAppSpec } from "../supervisor/daemon_spec.ts";
import { EmbeddedBackend, type PoolSettings } from "../supervisor/embedded_backend.ts";
import type { Logger } from "../supervisor/log.ts";
import { IsolatePool } from "../supervisor/pool.ts";
import { splitMount } from "./environ.ts";
import type { MountSpec, ServerOptions } from "./options.ts";

/** A mount whose groups do not fit the `--daemon` definitions. */
export class MountConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "MountConfigError";
  }
}

const PROCESS_GROUP_SUFFIX = /:process-group=([^:]*)$/;

/** Splits `SCRIPT:process-group=GROUP` into the script and the group name. */
export function splitProcessGroup(value: string): { script: string; processGroup?: string } {
  const match = value.match(PROCESS_GROUP_SUFFIX);
  if (!match) return { script: value };
  return { script: value.slice(0, match.index), processGroup: match[1] };
}

/** The mounts and groups as parsed, before their groups are checked. */
export interface MountPlan {
  main: { mountPoint: string; app: AppSpec; processGroup?: string };
  mounts: MountSpec[];
  groups: DaemonGroupSpec[];
}

/**
 * Checks that every named group exists, every group serves exactly one
 * application, and no two mounts share a prefix. With one group, no
 * `--mount` and no `--process-group`, the main application goes to that
 * group. Returns the main application's group.
 *
 * @throws {MountConfigError} With the option, the value and the fix.
 */
export function assignProcessGroups(plan: MountPlan): string | undefined {
  const names = new Set<string>();
  for (const group of plan.groups) {
    if (names.has(group.name)) {
      throw new MountConfigError(
        `group '${group.name}' is defined by more than one --daemon (rename one)`,
      );
    }
    names.add(group.name);
  }

  let mainGroup = plan.main.processGroup;
  if (mainGroup === undefined && plan.groups.length === 1 && plan.mounts.length === 0) {
    mainGroup = plan.groups[0].name;
  }
  const all = [{ ...plan.main, processGroup: mainGroup }, ...plan.mounts];

  const prefixes = new Set<string>();
  for (const mount of all) {
    if (prefixes.has(mount.mountPoint)) {
      throw new MountConfigError(
        `two applications are mounted at '${
          mount.mountPoint || "/"
        }' (give each --mount its own URL)`,
      );
    }
    prefixes.add(mount.mountPoint);
    if (mount.processGroup !== undefined && !names.has(mount.processGroup)) {
      const defined = names.size ? [...names].join(", ") : "none";
      throw new MountConfigError(
        `process group '${mount.processGroup}' is not defined (define it with --daemon ` +
          `group=${mount.processGroup},...; defined groups: ${defined})`,
      );
    }
  }

  for (const group of plan.groups) checkGroupUse(group.name, all);
  return mainGroup;
}

function appIdentity(app: AppSpec): string {
  return `${app.scriptPath ?? app.module}:${app.callable}`;
}

function checkGroupUse(name: string, mounts: { app: AppSpec; processGroup?: string }[]): void {
  const users = mounts.filter((mount) => mount.processGroup === name);
  if (users.length === 0) {
    throw new MountConfigError(
      `group '${name}' is not used by any mount (add --process-group ${name}, or ` +
        `:process-group=${name} after a --mount SCRIPT)`,
    );
  }
  const identities = new Set(users.map((mount) => appIdentity(mount.app)));
  if (identities.size > 1) {
    throw new MountConfigError(
      `group '${name}' would run ${[...identities].join(" and ")}; a group runs one ` +
        "application, so define one --daemon group per script",
    );
  }
}

/** Returns the daemon group that runs `spec`, or undefined for an embedded mount. */
function findGroupSpec(options: ServerOptions, spec: MountSpec): DaemonGroupSpec | undefined {
  return options.daemonGroups.find((group) => group.name === spec.processGroup);
}

/** One mount as the server routes to it. */
export interface Mount {
  mountPoint: string;
  app: AppSpec;
  backend: AppBackend;
  /** Host folders `wsgi.file_wrapper` may send from (embedded mounts only). */
  filePaths: string[];
  /**
   * Logger whose lines name the application, for a daemon mount its group,
   * and the mount's prefix when another mount has the same application name
   * and group (see mountsNeedingPrefix).
   */
  logger: Logger;
}

/** Returns the prefix as log lines show it: `mount=/a`, or `mount=/` for the root. */
function mountLabel(mountPoint: string): string {
  return mountPoint || "/";
}

/** The default context of a mount's log lines: app name and, for a daemon mount, group. */
interface MountLogIdentity {
  mountPoint: string;
  appName: string;
  group?: string;
}

/**
 * Returns the mount points whose log lines must also name the mount.
 *
 * A mount's lines name its application by file or module name and, for a
 * daemon mount, its group. When two mounts share both, for example one
 * script mounted at two prefixes, or two `app.wsgi` files from different
 * folders, their lines would look the same. A mount whose app name and
 * group differ from every other mount's gets no `mount=` key, so its lines
 * stay as they were.
 */
function mountsNeedingPrefix(mounts: MountLogIdentity[]): Set<string> {
  const contextOf = (mount: MountLogIdentity) => JSON.stringify([mount.appName, mount.group]);
  const counts = new Map<string, number>();
  for (const mount of mounts) {
    const context = contextOf(mount);
    counts.set(context, (counts.get(context) ?? 0) + 1);
  }
  const shared = mounts.filter((mount) => counts.get(contextOf(mount))! > 1);
  return new Set(shared.map((mount) => mount.mountPoint));
}

/** Logs each folder that a python-path `.pth` file lists but the isolates cannot read. */
function warnUnreadablePathEntries(app: AppSpec, logger: Logger, fix: string): void {
  for (const { file, folder } of unreadablePathEntries(app)) {
    logger.warning(
      `${file} lists ${folder}, which lies outside the application's folders, so the ` +
        `isolates cannot read it and Python skips it; ${fix}`,
    );
  }
}

/** The mounts of a running server, longest prefix first. */
export class MountTable {
  readonly mounts: Mount[];
  readonly groups: DaemonGroup[];

  constructor(options: ServerOptions, logger: Logger) {
    const groups = new Map<string, DaemonGroup>();
    const specs = [
      { mountPoint: options.mountPoint, app: options.app, processGroup: options.processGroup },
      ...options.mounts,
    ];
    const labelled = mountsNeedingPrefix(specs.map((spec) => ({
      mountPoint: spec.mountPoint,
      appName: spec.app.name,
      group: findGroupSpec(options, spec)?.name,
    })));
    this.mounts = specs.map((spec) =>
      this.#makeMount(spec, options, logger, groups, labelled.has(spec.mountPoint))
    );
    this.mounts.sort((a, b) => b.mountPoint.length - a.mountPoint.length);
    this.groups = [...groups.values()];
  }

  /** Builds a mount and its backend. `labelled` adds `mount=PREFIX` to its log lines. */
  #makeMount(
    spec: MountSpec,
    options: ServerOptions,
    logger: Logger,
    groups: Map<string, DaemonGroup>,
    labelled: boolean,
  ): Mount {
    // An undefined value leaves the key out of the lines.
    const mountPrefix = labelled ? mountLabel(spec.mountPoint) : undefined;
    const groupSpec = findGroupSpec(options, spec);
    if (!groupSpec) {
      const appLogger = logger.child({ app: spec.app.name, mount: mountPrefix, pid: Deno.pid });
      warnUnreadablePathEntries(spec.app, appLogger, "add it with --python-path");
      // The folders the isolates mount: a file the application opened there
      // may be sent. Each pool adds the real paths it mounts.
      const filePaths = appReadPaths(spec.app);
      const createPool = (settings: PoolSettings) => {
        const app = pinMountRoots(spec.app);
        for (const root of Object.values(app.mountRoots ?? {})) {
          if (!filePaths.includes(root)) filePaths.push(root);
        }
        return new IsolatePool(app, {
          size: options.threads,
          minSize: options.minThreads,
          idleTimeoutMs: options.inactivityTimeoutMs,
          maxRequests: options.maximumRequests,
          memoryLimitBytes: options.memoryLimitBytes,
          memoryMaxBytes: options.memoryMaxBytes,
          queueLimit: options.queueLimit,
          requestTimeoutMs: options.requestTimeoutMs,
          queueTimeoutMs: options.queueTimeoutMs,
          logger: appLogger,
          ...settings,
        });
      };
      const backend = new EmbeddedBackend(createPool, appLogger);
      return { mountPoint: spec.mountPoint, app: spec.app, backend, filePaths, logger: appLogger };
    }

    const app = groupAppSpec(spec.app, groupSpec);
    let group = groups.get(groupSpec.name);
    if (!group) {
      // The group's own lines (its processes, reloads) belong to every mount
      // that uses it, so they name the group and never one mount.
      const groupLogger = logger.child({ app: app.name, group: groupSpec.name });
      warnUnreadablePathEntries(app, groupLogger, "add it to the group's python-path");
      group = new DaemonGroup(groupSpec, app, {
        logger: groupLogger,
        logLevel: options.logLevel,
        queueLimit: options.queueLimit,
      });
      groups.set(groupSpec.name, group);
    }
    const appLogger = logger.child({ app: app.name, mount: mountPrefix, group: groupSpec.name });
    // A daemon sends file_wrapper files itself, so the front reads no file for it.
    return { mountPoint: spec.mountPoint, app, backend: group, filePaths: [], logger: appLogger };
  }

  /** Every distinct backend, each once. */
  get backends(): AppBackend[] {
    return [...new Set(this.mounts.map((mount) => mount.backend))];
  }

  /** Returns the mount for a decoded path with its SCRIPT_NAME and PATH_INFO, or undefined. */
  route(path: string): { mount: Mount; scriptName: string; pathInfo: string } | undefined {
    for (const mount of this.mounts) {
      const split = splitMount(path, mount.mountPoint);
      if (split) return { mount, scriptName: split[0], pathInfo: split[1] };
    }
    return undefined;
  }

  /** Starts every backend; resolves when all can serve. */
  start(): Promise<void> {
    return Promise.all(this.backends.map((backend) => backend.start())).then(() => {});
  }

  /**
   * Replaces the interpreters of every backend, embedded and daemon groups.
   * With `reimport` (SIGHUP), their application snapshots are built again.
   */
  reload(reason: string, reimport = false): void {
    if (reimport) {
      const now = Date.now();
      // A daemon group and an embedded pool each read this from the spec at their next start.
      for (const mount of this.mounts) mount.app.snapshotNotBefore = now;
    }
    for (const backend of this.backends) backend.reload(reason);
  }

  /** Makes every backend ignore reloads, because the server is stopping. */
  stopReloads(): void {
    for (const backend of this.backends) backend.stopReloads();
  }

  /** Stops every backend at once. */
  async stop(): Promise<void> {
    await Promise.all(this.backends.map((backend) => backend.stop()));
  }
}
