//! A fake Kubernetes API server for the agent's watch: plain HTTP/1.1 on threads, inside the
//! node's namespace, named in a kubeconfig the test writes.
//!
//! It speaks the list/watch protocol as kube-runtime's `watcher` uses it (kube 5, default
//! `watcher::Config`, read from its source):
//! - lists: `GET <path>?limit=500[&continue=T]`, no `Accept` header (JSON); the answer carries
//!   `metadata.resourceVersion` and, while more remain, `metadata.continue`. Pages come from
//!   one snapshot; a continue token older than the retained history gets HTTP 410, as the real
//!   server's "continue parameter is too old".
//! - watches: `GET <path>?watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=N`
//!   with `Accept-Encoding: identity`; chunked JSON lines of ADDED/MODIFIED/DELETED, BOOKMARK
//!   when allowed (every `bookmark_every`, and as the stream times out), and for a
//!   resourceVersion older than the retained history an ERROR event carrying a Status with
//!   code 410 — how a real API server reports an expired watch (HTTP 200, then the error
//!   event). `sendInitialEvents=true` (streaming lists) sends the current objects as ADDED
//!   and a BOOKMARK annotated `k8s.io/initial-events-end`; `resourceVersion` 0 or unset
//!   without it sends them as ADDED too (legacy "any" semantics).
//! - a bearer token, if configured, is required (401 otherwise); an `Accept` that allows no
//!   JSON gets 406. Namespaced paths (`/api/v1/namespaces/NS/configmaps`) and the field
//!   selectors `metadata.name=` / `metadata.namespace=` narrow lists and watches, as the
//!   agent's watch of the kube-dns ConfigMap uses them; any other selector is refused (400)
//!   rather than silently ignored.
//!
//! And it fails on demand: [`FakeApi::drop_watches`] cuts every open watch mid-stream,
//! [`FakeApi::set_down`] closes the listener (connections are refused) and every connection,
//! [`FakeApi::compact`] forgets history so that resuming needs a relist,
//! [`FakeApi::hold_lists`] keeps list requests waiting.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io::{BufRead as _, BufReader, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::Netns;

/// The resources the agent watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Namespaces,
    Services,
    EndpointSlices,
    ConfigMaps,
    /// Watched with `fieldSelector=spec.nodeName=<node>` (`--autopath`).
    Pods,
}

impl Resource {
    pub const ALL: [Resource; 5] = [
        Self::Namespaces,
        Self::Services,
        Self::EndpointSlices,
        Self::ConfigMaps,
        Self::Pods,
    ];

    /// The path of the resource in every namespace.
    pub fn path(self) -> &'static str {
        match self {
            Self::Namespaces => "/api/v1/namespaces",
            Self::Services => "/api/v1/services",
            Self::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Self::ConfigMaps => "/api/v1/configmaps",
            Self::Pods => "/api/v1/pods",
        }
    }

    /// The path of the resource in one namespace (`/api/v1/namespaces/NS/configmaps`).
    pub fn namespaced_path(self, namespace: &str) -> String {
        let (prefix, plural) = self.path().rsplit_once('/').expect("a path");
        format!("{prefix}/namespaces/{namespace}/{plural}")
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Namespaces => "Namespace",
            Self::Services => "Service",
            Self::EndpointSlices => "EndpointSlice",
            Self::ConfigMaps => "ConfigMap",
            Self::Pods => "Pod",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::EndpointSlices => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn of_kind(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.kind() == kind)
    }

    /// The resource a request path names, and the namespace it is narrowed to.
    fn of_path(path: &str) -> Option<(Self, Option<String>)> {
        if let Some(r) = Self::ALL.into_iter().find(|r| r.path() == path) {
            return Some((r, None));
        }
        Self::ALL
            .into_iter()
            .filter(|r| *r != Self::Namespaces)
            .find_map(|r| {
                let (prefix, plural) = r.path().rsplit_once('/')?;
                let ns = path
                    .strip_prefix(prefix)?
                    .strip_prefix("/namespaces/")?
                    .strip_suffix(plural)?
                    .strip_suffix('/')?;
                (!ns.is_empty() && !ns.contains('/')).then(|| (r, Some(ns.to_string())))
            })
    }
}

/// What a list or watch is narrowed to: a namespace (from the path or a field selector), a
/// name (a field selector).
#[derive(Clone, Debug, Default)]
struct Scope {
    namespace: Option<String>,
    name: Option<String>,
    /// `spec.nodeName` of Pods (`--autopath` watches this node's).
    node: Option<String>,
}

impl Scope {
    /// `namespace` from the path, and the request's field selector: `metadata.name=X` and
    /// `metadata.namespace=X` terms (`=` or `==`), comma-separated, and `spec.nodeName=X` of
    /// Pods. Anything else: `Err`.
    fn of(namespace: Option<String>, req: &Request) -> Result<Self, String> {
        let mut scope = Self {
            namespace,
            name: None,
            node: None,
        };
        if let Some(selector) = req.query.get("fieldSelector") {
            for term in selector.split(',').filter(|t| !t.is_empty()) {
                let (field, value) = term
                    .split_once("==")
                    .or_else(|| term.split_once('='))
                    .filter(|(f, _)| !f.ends_with('!'))
                    .ok_or_else(|| format!("the fake API does not implement {term:?}"))?;
                match field {
                    "metadata.name" => scope.name = Some(value.to_string()),
                    "metadata.namespace" => scope.namespace = Some(value.to_string()),
                    "spec.nodeName" if req.path.ends_with("/pods") => {
                        scope.node = Some(value.to_string());
                    }
                    _ => return Err(format!("the fake API does not implement {term:?}")),
                }
            }
        }
        Ok(scope)
    }

    /// Whether the object `namespace/name` is in scope; `object` is asked only for Pods'
    /// node, and only when the scope names one.
    fn admits(&self, namespace: &str, name: &str, object: impl FnOnce() -> Value) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == namespace)
            && self.name.as_deref().is_none_or(|n| n == name)
            && self
                .node
                .as_deref()
                .is_none_or(|node| object()["spec"]["nodeName"].as_str() == Some(node))
    }
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Request {
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub headers: BTreeMap<String, String>,
}

impl Request {
    pub fn is_watch(&self) -> bool {
        self.query.get("watch").map(String::as_str) == Some("true")
    }
}

/// What the fake has done, for assertions.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// List pages served.
    pub list_pages: u64,
    /// Watch streams opened.
    pub watches: u64,
    pub bookmarks: u64,
    /// ERROR events with code 410 (watch) and HTTP 410 answers (list continue).
    pub gone: u64,
    /// Connections accepted in the moment the listener was closing, closed unanswered.
    pub refused: u64,
    /// Watch streams open now.
    pub open_watches: u64,
}

type Key = (Resource, String, String);

struct Event {
    rv: u64,
    resource: Resource,
    namespace: String,
    name: String,
    /// The whole watch line, without the newline.
    line: Arc<str>,
}

struct Snapshot {
    rv: u64,
    items: Arc<Vec<Arc<str>>>,
}

struct State {
    rv: u64,
    objects: BTreeMap<Key, (Value, Arc<str>)>,
    history: VecDeque<Event>,
    /// Watches may resume from this resourceVersion or later; older ones get 410.
    oldest: u64,
    snapshots: HashMap<u64, Snapshot>,
    next_snapshot: u64,
    hold_lists: bool,
    down: bool,
    /// Bumped to cut every open watch.
    cut: u64,
    connections: HashMap<u64, TcpStream>,
    next_conn: u64,
    requests: Vec<Request>,
    stats: Stats,
    /// When each resourceVersion was first written to a watch stream.
    written: HashMap<u64, Instant>,
    bookmark_every: Duration,
    token: Option<String>,
    forbidden: std::collections::BTreeSet<Resource>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fake API server. Stops (and closes every connection) on drop.
pub struct FakeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    netns: String,
    listener: Option<(Arc<TcpListener>, JoinHandle<()>)>,
}

impl FakeApi {
    /// Listens on 127.0.0.1 of `ns` (the node's namespace, where the agent runs).
    pub fn start(ns: &Netns) -> Self {
        let listener = ns.enter(|| TcpListener::bind("127.0.0.1:0").expect("fake API: bind"));
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                oldest: 1,
                snapshots: HashMap::new(),
                next_snapshot: 1,
                hold_lists: false,
                down: false,
                cut: 0,
                connections: HashMap::new(),
                next_conn: 0,
                requests: Vec::new(),
                stats: Stats::default(),
                written: HashMap::new(),
                bookmark_every: Duration::from_secs(1),
                token: Some(format!("fake-token-{}", std::process::id())),
                forbidden: Default::default(),
            }),
            changed: Condvar::new(),
        });
        let mut api = Self {
            shared,
            addr,
            netns: ns.name.clone(),
            listener: None,
        };
        api.serve(listener);
        api
    }

    fn serve(&mut self, listener: TcpListener) {
        let listener = Arc::new(listener);
        let shared = self.shared.clone();
        let l = listener.clone();
        let handle = std::thread::spawn(move || accept_loop(&l, &shared));
        self.listener = Some((listener, handle));
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig naming this server (plain HTTP, bearer token) into `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let token = self.shared.lock().token.clone().unwrap_or_default();
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\n\
                 users:\n- name: agent\n  user: {{token: \"{token}\"}}\ncontexts:\n\
                 - name: fake\n  context: {{cluster: fake, user: agent}}\ncurrent-context: fake\n",
                self.url()
            ),
        )
        .expect("writing kubeconfig");
        path
    }

    /// Creates or replaces an object (its `kind` says which resource); watchers see ADDED or
    /// MODIFIED. Returns its new resourceVersion.
    pub fn apply(&self, object: Value) -> u64 {
        let kind = object["kind"].as_str().unwrap_or_default();
        let resource =
            Resource::of_kind(kind).unwrap_or_else(|| panic!("fake API: no resource for {kind:?}"));
        let mut st = self.shared.lock();
        let rv = st.rv + 1;
        st.rv = rv;
        let key = key_of(resource, &object);
        let existed = st.objects.contains_key(&key);
        let object = stamp(object, resource, rv);
        let text: Arc<str> = object.to_string().into();
        let ty = if existed { "MODIFIED" } else { "ADDED" };
        let line = format!("{{\"type\":\"{ty}\",\"object\":{text}}}").into();
        let (_, namespace, name) = key.clone();
        st.objects.insert(key, (object, text));
        st.history.push_back(Event {
            rv,
            resource,
            namespace,
            name,
            line,
        });
        drop(st);
        self.shared.changed.notify_all();
        rv
    }

    /// Deletes an object; watchers see DELETED with its last state. Returns the new
    /// resourceVersion, or None if there was no such object.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> Option<u64> {
        let mut st = self.shared.lock();
        let (object, _) =
            st.objects
                .remove(&(resource, namespace.to_string(), name.to_string()))?;
        let rv = st.rv + 1;
        st.rv = rv;
        let object = stamp(object, resource, rv);
        let line = format!("{{\"type\":\"DELETED\",\"object\":{object}}}").into();
        st.history.push_back(Event {
            rv,
            resource,
            namespace: namespace.to_string(),
            name: name.to_string(),
            line,
        });
        drop(st);
        self.shared.changed.notify_all();
        Some(rv)
    }

    /// Forgets the history: a watch resuming from any earlier resourceVersion gets 410 Gone
    /// and must relist (as after etcd compaction, or a long disconnect).
    pub fn compact(&self) {
        let mut st = self.shared.lock();
        st.oldest = st.rv;
        st.history.clear();
        st.snapshots.clear();
    }

    /// Cuts every open watch stream mid-stream, as a lost connection would.
    pub fn drop_watches(&self) {
        self.shared.lock().cut += 1;
        self.shared.changed.notify_all();
    }

    /// Down: the listener is closed (connections are refused) and every connection is cut.
    /// Up: listens again on the same address.
    pub fn set_down(&mut self, down: bool) {
        if down {
            let mut st = self.shared.lock();
            st.down = true;
            st.cut += 1;
            for (_, c) in st.connections.drain() {
                let _ = c.shutdown(Shutdown::Both);
            }
            drop(st);
            self.shared.changed.notify_all();
            if let Some((listener, handle)) = self.listener.take() {
                // shutdown(2) on a listening socket wakes the thread blocked in accept(2).
                // SAFETY: a valid socket fd owned by `listener`, which outlives the call.
                unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
                let _ = handle.join();
            }
        } else {
            let addr = self.addr;
            let listener = Netns::existing(&self.netns).enter(move || {
                TcpListener::bind(addr).expect("fake API: listening again on the same address")
            });
            self.shared.lock().down = false;
            self.serve(listener);
        }
    }

    /// While held, list requests wait (the agent cannot finish its first sync).
    pub fn hold_lists(&self, hold: bool) {
        self.shared.lock().hold_lists = hold;
        self.shared.changed.notify_all();
    }

    /// While forbidden, lists and watches of `resource` get 403, as without RBAC.
    pub fn forbid(&self, resource: Resource, forbidden: bool) {
        let mut st = self.shared.lock();
        if forbidden {
            st.forbidden.insert(resource);
        } else {
            st.forbidden.remove(&resource);
        }
    }

    pub fn set_bookmark_every(&self, every: Duration) {
        self.shared.lock().bookmark_every = every;
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    pub fn stats(&self) -> Stats {
        self.shared.lock().stats.clone()
    }

    /// When the event of resourceVersion `rv` was first written to a watch stream.
    pub fn written_at(&self, rv: u64) -> Option<Instant> {
        self.shared.lock().written.get(&rv).copied()
    }

    /// Watch streams currently open.
    pub fn open_watches(&self) -> u64 {
        self.shared.lock().stats.open_watches
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.set_down(true);
    }
}

fn key_of(resource: Resource, object: &Value) -> Key {
    let meta = &object["metadata"];
    let ns = match resource {
        Resource::Namespaces => String::new(),
        _ => meta["namespace"].as_str().unwrap_or("default").to_string(),
    };
    let name = meta["name"]
        .as_str()
        .expect("fake API: objects need metadata.name");
    (resource, ns, name.to_string())
}

/// Sets what the API server sets: kind, apiVersion, resourceVersion, uid.
fn stamp(mut object: Value, resource: Resource, rv: u64) -> Value {
    object["kind"] = json!(resource.kind());
    object["apiVersion"] = json!(resource.api_version());
    let meta = &mut object["metadata"];
    meta["resourceVersion"] = json!(rv.to_string());
    if meta.get("uid").is_none() {
        meta["uid"] = json!(format!("00000000-0000-0000-0000-{rv:012}"));
    }
    object
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else {
            // shut down by set_down
            return;
        };
        let mut st = shared.lock();
        if st.down {
            st.stats.refused += 1;
            return;
        }
        let id = st.next_conn;
        st.next_conn += 1;
        if let Ok(c) = stream.try_clone() {
            st.connections.insert(id, c);
        }
        drop(st);
        let shared = shared.clone();
        std::thread::spawn(move || {
            let _ = stream.set_nodelay(true);
            let _ = connection(stream, &shared);
            shared.lock().connections.remove(&id);
        });
    }
}

/// Serves requests on one keep-alive connection.
fn connection(stream: TcpStream, shared: &Arc<Shared>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let query: BTreeMap<String, String> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        let request = Request {
            path: path.to_string(),
            query,
            headers,
        };
        shared.lock().requests.push(request.clone());
        if !respond(&mut out, shared, method, &request)? {
            return Ok(());
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status(code: u16, reason: &str, message: &str) -> String {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
    .to_string()
}

fn send_body(out: &mut TcpStream, code: u16, text: &str, body: &str) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 {code} {text}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

/// One watch event (a JSON line) as one HTTP chunk, in one write.
fn chunk(out: &mut impl std::io::Write, line: &str) -> std::io::Result<()> {
    out.write_all(format!("{:x}\r\n{line}\n\r\n", line.len() + 1).as_bytes())
}

/// Answers one request. `Ok(false)`: close the connection.
fn respond(
    out: &mut TcpStream,
    shared: &Arc<Shared>,
    method: &str,
    req: &Request,
) -> std::io::Result<bool> {
    if method != "GET" {
        send_body(
            out,
            405,
            "Method Not Allowed",
            &status(
                405,
                "MethodNotAllowed",
                "the fake API only lists and watches",
            ),
        )?;
        return Ok(true);
    }
    let token = shared.lock().token.clone();
    if let Some(token) = token
        && req.headers.get("authorization") != Some(&format!("Bearer {token}"))
    {
        send_body(
            out,
            401,
            "Unauthorized",
            &status(401, "Unauthorized", "Unauthorized"),
        )?;
        return Ok(true);
    }
    if let Some(accept) = req.headers.get("accept")
        && !(accept.contains("application/json") || accept.contains("*/*"))
    {
        send_body(
            out,
            406,
            "Not Acceptable",
            &status(406, "NotAcceptable", "only application/json is served"),
        )?;
        return Ok(true);
    }
    let Some((resource, namespace)) = Resource::of_path(&req.path) else {
        send_body(
            out,
            404,
            "Not Found",
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        )?;
        return Ok(true);
    };
    if shared.lock().forbidden.contains(&resource) {
        let (group, plural) = resource.path().rsplit_once('/').unwrap_or_default();
        let group = group
            .strip_prefix("/apis/")
            .map_or("", |g| g.trim_end_matches("/v1"));
        let verb = if req.is_watch() { "watch" } else { "list" };
        send_body(
            out,
            403,
            "Forbidden",
            &status(
                403,
                "Forbidden",
                &format!(
                    "{plural}{} is forbidden: User \"system:serviceaccount:kube-system:xdns\" \
                     cannot {verb} resource \"{plural}\" in API group \"{group}\" at the \
                     cluster scope",
                    if group.is_empty() {
                        String::new()
                    } else {
                        format!(".{group}")
                    }
                ),
            ),
        )?;
        return Ok(true);
    }
    let scope = match Scope::of(namespace, req) {
        Ok(scope) if !req.query.contains_key("labelSelector") => scope,
        Ok(_) | Err(_) => {
            send_body(
                out,
                400,
                "Bad Request",
                &status(
                    400,
                    "BadRequest",
                    "the fake API implements no label selector, and field selectors on \
                     metadata.name and metadata.namespace only",
                ),
            )?;
            return Ok(true);
        }
    };
    if req.is_watch() {
        watch(out, shared, resource, &scope, req)
    } else {
        list(out, shared, resource, &scope, req).map(|()| true)
    }
}

fn list(
    out: &mut TcpStream,
    shared: &Arc<Shared>,
    resource: Resource,
    scope: &Scope,
    req: &Request,
) -> std::io::Result<()> {
    let limit: usize = req
        .query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let mut st = shared.lock();
    while st.hold_lists && !st.down {
        st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    if st.down {
        return Err(std::io::ErrorKind::ConnectionAborted.into());
    }
    // Continue tokens are "<snapshot>-<offset>".
    let (snapshot_id, offset) = match req.query.get("continue") {
        Some(token) => {
            let parsed = token
                .split_once('-')
                .and_then(|(s, o)| Some((s.parse::<u64>().ok()?, o.parse::<usize>().ok()?)));
            match parsed.filter(|(s, _)| st.snapshots.contains_key(s)) {
                Some(p) => p,
                None => {
                    st.stats.gone += 1;
                    drop(st);
                    return send_body(
                        out,
                        410,
                        "Gone",
                        &status(
                            410,
                            "Expired",
                            "The provided continue parameter is too old to display a consistent \
                             list result. You can start a new list without the continue parameter.",
                        ),
                    );
                }
            }
        }
        None => {
            let items: Vec<Arc<str>> = st
                .objects
                .range((resource, String::new(), String::new())..)
                .take_while(|((r, _, _), _)| *r == resource)
                .filter(|((_, ns, name), (object, _))| scope.admits(ns, name, || object.clone()))
                .map(|(_, (_, text))| text.clone())
                .collect();
            let id = st.next_snapshot;
            st.next_snapshot += 1;
            let rv = st.rv;
            st.snapshots.insert(
                id,
                Snapshot {
                    rv,
                    items: Arc::new(items),
                },
            );
            (id, 0)
        }
    };
    let snapshot = &st.snapshots[&snapshot_id];
    let (rv, items) = (snapshot.rv, snapshot.items.clone());
    let end = offset.saturating_add(limit).min(items.len());
    let more = end < items.len();
    if !more {
        st.snapshots.remove(&snapshot_id);
    }
    st.stats.list_pages += 1;
    drop(st);
    let mut body = String::with_capacity(
        64 + items[offset..end]
            .iter()
            .map(|i| i.len() + 1)
            .sum::<usize>(),
    );
    body.push_str(&format!(
        "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{rv}\"",
        resource.kind(),
        resource.api_version()
    ));
    if more {
        body.push_str(&format!(",\"continue\":\"{snapshot_id}-{end}\""));
    }
    body.push_str("},\"items\":[");
    for (i, item) in items[offset..end].iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str("]}");
    send_body(out, 200, "OK", &body)
}

/// Does `object` pass the request's field selector (only `spec.nodeName=<node>` is known)?
/// Streams a watch. `Ok(false)` when the connection must close (cut or down).
fn watch(
    out: &mut TcpStream,
    shared: &Arc<Shared>,
    resource: Resource,
    scope: &Scope,
    req: &Request,
) -> std::io::Result<bool> {
    let bookmarks = req.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let initial_events = req.query.get("sendInitialEvents").map(String::as_str) == Some("true");
    let timeout = Duration::from_secs(
        req.query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(1800),
    );
    let from = req
        .query
        .get("resourceVersion")
        .cloned()
        .unwrap_or_default();
    let started = Instant::now();
    let bookmark = |rv: u64, initial_end: bool| {
        let annotations = if initial_end {
            json!({"k8s.io/initial-events-end": "true"})
        } else {
            json!({})
        };
        json!({"type": "BOOKMARK", "object": {
            "kind": resource.kind(), "apiVersion": resource.api_version(),
            "metadata": {"resourceVersion": rv.to_string(), "annotations": annotations},
        }})
        .to_string()
    };

    let mut st = shared.lock();
    let cut = st.cut;
    st.stats.watches += 1;
    st.stats.open_watches += 1;
    drop(st);
    /// Counts the stream closed however the function returns.
    struct Open<'a>(&'a Shared);
    impl Drop for Open<'_> {
        fn drop(&mut self) {
            self.0.lock().stats.open_watches -= 1;
        }
    }
    let _open = Open(shared);
    let mut st = shared.lock();
    // What to send first, and from which resourceVersion the stream continues.
    let mut first: Vec<String> = Vec::new();
    let mut cursor;
    if initial_events || from.is_empty() || from == "0" {
        cursor = st.rv;
        for ((r, ns, name), (object, text)) in st.objects.iter() {
            if *r == resource && scope.admits(ns, name, || object.clone()) {
                first.push(format!("{{\"type\":\"ADDED\",\"object\":{text}}}"));
            }
        }
        if initial_events {
            first.push(bookmark(cursor, true));
        }
    } else {
        let Ok(rv) = from.parse::<u64>() else {
            drop(st);
            send_body(
                out,
                400,
                "Bad Request",
                &status(400, "BadRequest", "resourceVersion is not a number"),
            )?;
            return Ok(true);
        };
        if rv < st.oldest {
            st.stats.gone += 1;
            let oldest = st.oldest;
            drop(st);
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )?;
            let error = json!({"type": "ERROR", "object": serde_json::from_str::<Value>(&status(
                410, "Expired", &format!("too old resource version: {rv} ({oldest})"),
            )).expect("status JSON")});
            chunk(out, &error.to_string())?;
            write!(out, "0\r\n\r\n")?;
            out.flush()?;
            return Ok(true);
        }
        cursor = rv;
    }
    drop(st);
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    for line in &first {
        chunk(out, line)?;
    }
    out.flush()?;
    let mut last_write = Instant::now();
    loop {
        let mut st = shared.lock();
        if st.cut != cut || st.down {
            drop(st);
            // No terminating chunk: the client sees the stream break, as on a lost connection.
            let _ = out.shutdown(Shutdown::Both);
            return Ok(false);
        }
        let start = st.history.partition_point(|e| e.rv <= cursor);
        let lines: Vec<(u64, Arc<str>)> = st
            .history
            .range(start..)
            .filter(|e| {
                e.resource == resource
                    && scope.admits(&e.namespace, &e.name, || {
                        serde_json::from_str::<Value>(&e.line)
                            .map(|l| l["object"].clone())
                            .unwrap_or_default()
                    })
            })
            .map(|e| (e.rv, e.line.clone()))
            .collect();
        if let Some(last) = st.history.back() {
            cursor = cursor.max(last.rv);
        }
        if !lines.is_empty() {
            // Stamped before the write: a thread descheduled right after writing must not
            // make the agent look faster than it is.
            let now = Instant::now();
            for (rv, _) in &lines {
                st.written.entry(*rv).or_insert(now);
            }
            drop(st);
            // One write per batch: an event split over several segments can wait on the
            // peer's delayed ACK.
            let mut buf = Vec::new();
            for (_, line) in &lines {
                chunk(&mut buf, line)?;
            }
            out.write_all(&buf)?;
            out.flush()?;
            last_write = now;
            continue;
        }
        let now = Instant::now();
        if now >= started + timeout {
            let rv = st.rv;
            if bookmarks {
                st.stats.bookmarks += 1;
            }
            drop(st);
            if bookmarks {
                chunk(out, &bookmark(rv, false))?;
            }
            write!(out, "0\r\n\r\n")?;
            out.flush()?;
            return Ok(true);
        }
        let next_bookmark = last_write + st.bookmark_every;
        if bookmarks && now >= next_bookmark {
            st.stats.bookmarks += 1;
            let rv = st.rv;
            drop(st);
            chunk(out, &bookmark(rv, false))?;
            out.flush()?;
            last_write = now;
            continue;
        }
        let wake = if bookmarks {
            next_bookmark.min(started + timeout)
        } else {
            started + timeout
        };
        let _ = shared
            .changed
            .wait_timeout(st, wake.saturating_duration_since(now))
            .unwrap_or_else(|e| e.into_inner());
    }
}

// --- objects --------------------------------------------------------------------------------

pub fn namespace(name: &str) -> Value {
    json!({"kind": "Namespace", "metadata": {"name": name}})
}

/// A ClusterIP Service with a named port `http`/80.
pub fn service(ns: &str, name: &str, cluster_ip: &str) -> Value {
    json!({"kind": "Service", "metadata": {"name": name, "namespace": ns},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
}

/// A headless Service with a named port `db`/5432.
pub fn headless(ns: &str, name: &str) -> Value {
    json!({"kind": "Service", "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": "None", "ports": [{"name": "db", "port": 5432, "protocol": "TCP"}]}})
}

/// A ConfigMap with these data keys.
pub fn config_map(ns: &str, name: &str, data: &[(&str, &str)]) -> Value {
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({"kind": "ConfigMap", "metadata": {"name": name, "namespace": ns}, "data": data})
}

/// An IPv4 EndpointSlice of Service `service`, every address a ready endpoint.
pub fn slice(ns: &str, name: &str, service: &str, addresses: &[&str]) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true}}))
        .collect();
    json!({"kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "db", "port": 5432, "protocol": "TCP"}]})
}
