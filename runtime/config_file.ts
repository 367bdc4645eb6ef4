/**
 * The configuration file of --config: one setting per line, written as
 * the command-line option without its dashes, followed by its values, as
 * Apache's directives are written. `script` names SCRIPT.
 *
 * ```
 * # /etc/wsgirun/site.conf
 * script app.wsgi
 * port 8000
 * daemon group=site,processes=2,user=www-data
 * url-alias /static static
 * access-log-format '%h %t "%r" %>s %b %D'
 * ```
 *
 * Values are split at spaces. Single quotes keep everything up to the next
 * single quote, and double quotes keep everything up to the next double
 * quote, with a backslash before `"` or `\`. A `#` at the start of a word
 * begins a comment.
 */

/** One setting line: its words and its line number, for error messages. */
export interface ConfigLine {
  words: string[];
  line: number;
}

/** A line that cannot be split into words, with its line number. */
export class ConfigSyntaxError extends Error {
  readonly line: number;

  constructor(line: number, message: string) {
    super(message);
    this.line = line;
  }
}

/** Splits the text of a configuration file into its setting lines, skipping blank lines and comments. */
export function parseConfigText(text: string): ConfigLine[] {
  const lines: ConfigLine[] = [];
  // An editor may start the file with a byte order mark, and end lines with CR alone.
  const body = text.startsWith("\uFEFF") ? text.slice(1) : text;
  for (const [index, raw] of body.split(/\r\n|\r|\n/).entries()) {
    const words = splitWords(raw, index + 1);
    if (words.length > 0) lines.push({ words, line: index + 1 });
  }
  return lines;
}

function splitWords(raw: string, line: number): string[] {
  const words: string[] = [];
  let word: string | null = null;
  for (let i = 0; i < raw.length; i++) {
    const char = raw[i];
    if (char === " " || char === "\t") {
      if (word !== null) words.push(word);
      word = null;
      continue;
    }
    if (char === "#" && word === null) break;
    if (char === "'") {
      const end = raw.indexOf("'", i + 1);
      if (end < 0) throw new ConfigSyntaxError(line, "a single quote is not closed");
      word = (word ?? "") + raw.slice(i + 1, end);
      i = end;
      continue;
    }
    if (char === '"') {
      let quoted = "";
      let end = i + 1;
      for (; end < raw.length && raw[end] !== '"'; end++) {
        if (raw[end] === "\\" && (raw[end + 1] === '"' || raw[end + 1] === "\\")) end++;
        quoted += raw[end];
      }
      if (end >= raw.length) throw new ConfigSyntaxError(line, "a double quote is not closed");
      word = (word ?? "") + quoted;
      i = end;
      continue;
    }
    word = (word ?? "") + char;
  }
  if (word !== null) words.push(word);
  return words;
}
