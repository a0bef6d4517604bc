// Test setup against Azurite with Azure's own SDK (@azure/storage-blob, from NODE_PATH):
// create a container, upload a directory's files under a prefix, print an account SAS token
// (read + list on containers and objects, one hour) as JSON {"sas": "..."}.
//
// Usage: node hack/azure-setup.js CONNECTION_STRING CONTAINER [UPLOAD_DIR] [PREFIX]
"use strict";
const fs = require("fs");
const path = require("path");
const {
  BlobServiceClient,
  StorageSharedKeyCredential,
  generateAccountSASQueryParameters,
  AccountSASPermissions,
  AccountSASResourceTypes,
  AccountSASServices,
} = require("@azure/storage-blob");

function files(dir) {
  const out = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) out.push(...files(full));
    else if (entry.isFile()) out.push(full);
  }
  return out.sort();
}

async function main() {
  const [conn, container, upload, prefix] = process.argv.slice(2);
  const parts = Object.fromEntries(
    conn.split(";").filter(Boolean).map((p) => [p.slice(0, p.indexOf("=")), p.slice(p.indexOf("=") + 1)]),
  );
  const service = BlobServiceClient.fromConnectionString(conn);
  const client = service.getContainerClient(container);
  await client.createIfNotExists();
  if (upload) {
    for (const file of files(upload)) {
      const rel = path.relative(upload, file).split(path.sep).join("/");
      const name = prefix ? `${prefix.replace(/\/+$/, "")}/${rel}` : rel;
      await client.getBlockBlobClient(name).uploadFile(file);
    }
  }
  const cred = new StorageSharedKeyCredential(parts.AccountName, parts.AccountKey);
  const sas = generateAccountSASQueryParameters(
    {
      expiresOn: new Date(Date.now() + 3600 * 1000),
      permissions: AccountSASPermissions.parse("rl"),
      resourceTypes: AccountSASResourceTypes.parse("sco").toString(),
      services: AccountSASServices.parse("b").toString(),
    },
    cred,
  ).toString();
  process.stdout.write(JSON.stringify({ sas }) + "\n");
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
