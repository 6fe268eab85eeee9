// Validate an AsyncAPI document with the AsyncAPI project's own parser.
//
//   node validate_asyncapi.mjs INSTALL_DIR DOCUMENT
//
// INSTALL_DIR holds node_modules/@asyncapi/parser (deploy/local/asyncapi.sh
// installs it into .local/asyncapi). Prints one JSON line per diagnostic and
// exits 1 when any is an error or a warning.
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';

const [installDir, documentPath] = process.argv.slice(2);
if (!installDir || !documentPath) {
  console.error('usage: node validate_asyncapi.mjs INSTALL_DIR DOCUMENT');
  process.exit(2);
}
const require = createRequire(resolve(installDir, 'package.json'));
const { Parser } = require('@asyncapi/parser');
const diagnostics = await new Parser().validate(readFileSync(documentPath, 'utf8'));
const names = ['error', 'warning', 'information', 'hint'];
let failed = false;
for (const d of diagnostics) {
  const severity = names[d.severity] ?? String(d.severity);
  failed ||= d.severity <= 1;
  console.log(JSON.stringify({ severity, code: d.code, message: d.message, path: d.path }));
}
process.exit(failed ? 1 : 0);
