// A small offline viewer of /openapi.json: each operation with its summary, description, request body and
// responses, then the schemas. Text from the document only reaches the page through textContent.

const METHODS = ["get", "post", "put", "patch", "delete"];

function element(tag, text = "", className = "") {
  const node = document.createElement(tag);
  if (text) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function refName(schema) {
  return schema && typeof schema.$ref === "string" ? schema.$ref.split("/").pop() : null;
}

function schemaLink(schema) {
  const name = refName(schema);
  if (!name) return element("code", JSON.stringify(schema));
  const link = element("a", name);
  link.href = `#schema-${name}`;
  return link;
}

function operation(path, method, op) {
  const box = element("details", "", "op");
  box.id = `${method}-${path}`;
  const summary = element("summary");
  summary.append(element("span", method, `method ${method}`), element("span", path, "path"));
  if (op.summary) summary.append(element("span", op.summary, "muted"));
  const body = element("div", "", "body");
  if (op.description) body.append(element("p", op.description));
  const request = op.requestBody?.content?.["application/json"]?.schema;
  if (request) {
    const line = element("p", "Request body (JSON): ");
    line.append(schemaLink(request));
    body.append(line);
  }
  const list = element("ul");
  for (const [status, response] of Object.entries(op.responses || {})) {
    const item = element("li");
    item.append(element("strong", status), document.createTextNode(` ${response.description || ""} `));
    const schema = response.content && Object.values(response.content)[0]?.schema;
    if (schema) item.append(schemaLink(schema));
    list.append(item);
  }
  body.append(element("h3", "Responses"), list);
  box.append(summary, body);
  return box;
}

function render(doc) {
  document.getElementById("api-title").textContent = `${doc.info?.title || "API"} ${doc.info?.version || ""}`;
  document.getElementById("api-description").textContent = doc.info?.description || "";
  const operations = [];
  for (const [path, item] of Object.entries(doc.paths || {})) {
    for (const method of METHODS) if (item[method]) operations.push(operation(path, method, item[method]));
  }
  document.getElementById("operations").replaceChildren(...operations);
  const schemas = Object.entries(doc.components?.schemas || {}).map(([name, schema]) => {
    const box = element("details", "", "op");
    box.id = `schema-${name}`;
    box.append(element("summary", name, "path"), element("pre", JSON.stringify(schema, null, 2), "code"));
    return box;
  });
  document.getElementById("schemas").replaceChildren(...schemas);
}

function hashTarget() {
  try {
    return document.getElementById(decodeURIComponent(location.hash.slice(1)));
  } catch {
    return null; // a malformed escape (`#%E0`) names nothing
  }
}

function openTarget() {
  const target = location.hash && hashTarget();
  if (target instanceof HTMLDetailsElement) target.open = true;
}

try {
  const response = await fetch("/openapi.json");
  if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
  render(await response.json());
  openTarget();
  window.addEventListener("hashchange", openTarget);
} catch (error) {
  const box = document.getElementById("docs-error");
  box.textContent = `Could not load /openapi.json: ${error.message}`;
  box.hidden = false;
}
